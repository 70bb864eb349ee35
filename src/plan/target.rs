//! The automatic choice of target, by the kinds of [`PlanParams::targets`] in order.

use ndarray::Array2;

use super::path::Obstacles;
use super::{Geometry, PlanParams, TargetKind};
use crate::label::Label;
use crate::segment::components::components;
use crate::segment::Segmentation;

/// The peritendinous target sits this far above the tendon, mm.
const PERITENDINOUS_MM: f64 = 0.5;
/// The perineural target sits this far beyond the nerve's margin, mm (half the outer
/// diameter of a 22 G needle, 0.72 mm, rounded up: the needle's wall, not its axis, keeps
/// the margin).
const PERINEURAL_EXTRA_MM: f64 = 0.4;
/// Thinnest effusion the planner aims into, mm: the tip of a 21–22 G needle (0.7–0.8 mm) with
/// its bevel must sit inside with room on both sides; thinner fluid is left for the next kind.
const EFFUSION_MIN_DEPTH_MM: f64 = 2.0;

/// The first target found among the kinds asked for, as full-frame px (column, row), with the
/// obstacles built to choose it (an effusion's safe point needs them; the planner reuses
/// them).
pub(super) fn choose(
    seg: &Segmentation,
    g: &Geometry<'_>,
    params: &PlanParams,
    obstacles: &mut Option<Obstacles>,
) -> Option<([f64; 2], TargetKind)> {
    params.targets.iter().find_map(|&kind| {
        let t = match kind {
            TargetKind::JointSpace => joint_space(&seg.labels, g.mm),
            TargetKind::Effusion => effusion(seg, g, params, obstacles),
            TargetKind::Peritendinous => above(&seg.labels, Label::Tendon, PERITENDINOUS_MM, g),
            TargetKind::Intratendinous => inside(&seg.labels, Label::Tendon, g),
            TargetKind::Perineural => above(
                &seg.labels,
                Label::Nerve,
                params.nerve_margin_mm + super::NERVE_OUTLINE_ALLOWANCE_MM + PERINEURAL_EXTRA_MM,
                g,
            ),
            TargetKind::User => None,
        };
        t.map(|t| (t, kind))
    })
}

/// Per column, whether joint/effusion pixels in it lie between bone ends (a joint space)
/// rather than over bone (an effusion): the column holds no bone, and bone lies on both sides.
fn gap_columns(labels: &Array2<u8>) -> Vec<bool> {
    let w = labels.ncols();
    let mut bone = vec![false; w];
    let standard = labels.as_standard_layout();
    for row in standard.as_slice().unwrap_or(&[]).chunks_exact(w.max(1)) {
        for (b, &l) in bone.iter_mut().zip(row) {
            *b |= l == Label::Bone.code();
        }
    }
    let first = bone.iter().position(|b| *b);
    let last = bone.iter().rposition(|b| *b);
    (0..w)
        .map(|x| !bone[x] && matches!((first, last), (Some(a), Some(b)) if x > a && x < b))
        .collect()
}

/// The joint/effusion pixels (row, column) whose column's [`gap_columns`] entry is `gap`.
fn joint_pixels(labels: &Array2<u8>, gap: bool) -> Vec<(usize, usize)> {
    let gaps = gap_columns(labels);
    let joint = Label::Joint.code();
    let w = labels.ncols().max(1);
    let standard = labels.as_standard_layout();
    let flat = standard.as_slice().unwrap_or(&[]);
    let mut out = Vec::new();
    for (y, row) in flat.chunks_exact(w).enumerate() {
        if !row.contains(&joint) {
            continue;
        }
        for (x, (&l, &g)) in row.iter().zip(&gaps).enumerate() {
            if l == joint && g == gap {
                out.push((y, x));
            }
        }
    }
    out
}

/// The pixel of `pixels` nearest (in mm) to their centroid.
fn nearest_to_centroid(pixels: &[(usize, usize)], mm: (f64, f64)) -> Option<[f64; 2]> {
    let n = pixels.len() as f64;
    let cy = pixels.iter().map(|p| p.0 as f64).sum::<f64>() / n;
    let cx = pixels.iter().map(|p| p.1 as f64).sum::<f64>() / n;
    let d = |p: &(usize, usize)| {
        ((p.0 as f64 - cy) * mm.1).powi(2) + ((p.1 as f64 - cx) * mm.0).powi(2)
    };
    let best = pixels.iter().min_by(|a, b| d(a).total_cmp(&d(b)))?;
    Some([best.1 as f64, best.0 as f64])
}

/// The centre of the joint space: label 4 in columns without bone, between bone columns on
/// both sides (snapped to a joint pixel: the centroid of a curved recess may lie outside it).
/// Fluid bulging out of the joint over the gap counts: it is intra-articular, and it is where a
/// needle reaches the joint clear of the bone ends.
fn joint_space(labels: &Array2<u8>, mm: (f64, f64)) -> Option<[f64; 2]> {
    let joint = joint_pixels(labels, true);
    (!joint.is_empty())
        .then(|| nearest_to_centroid(&joint, mm))
        .flatten()
}

/// How far above an effusion's floor its target sits, mm: the deepest safe point of the
/// collection, where fluid pools, with the bevel of a 21–22 G needle (about 1 mm long) inside
/// the fluid rather than against the capsule or cartilage beneath. The same convention as the
/// truth files of both simulators (the collection's middle, 1 mm above its floor).
const EFFUSION_ABOVE_FLOOR_MM: f64 = 1.0;

/// The target in an effusion (label 4 not between bone ends): in the largest collection deep
/// enough for a needle tip, [`EFFUSION_ABOVE_FLOOR_MM`] above its floor in its middle column
/// (midway up that column when it is thinner than that). If that point does not keep every
/// margin, the collection's pixel nearest to it that does; else the one with the most room.
fn effusion(
    seg: &Segmentation,
    g: &Geometry<'_>,
    params: &PlanParams,
    obstacles: &mut Option<Obstacles>,
) -> Option<[f64; 2]> {
    let labels = &seg.labels;
    let mut mask = Array2::from_elem(labels.dim(), false);
    for p in joint_pixels(labels, false) {
        mask[p] = true;
    }
    let min_rows = EFFUSION_MIN_DEPTH_MM / g.mm.1;
    let fluid = components(&mask)
        .into_iter()
        .filter(|c| c.extent().0 as f64 >= min_rows)
        .max_by_key(|c| c.area())?;
    let ideal = effusion_point(&fluid.pixels, fluid.bbox, g.mm)?;
    let obstacles = obstacles.get_or_insert_with(|| {
        Obstacles::new(
            &seg.obstacle_labels(),
            g.mm,
            &params.rules(TargetKind::Effusion),
        )
    });
    let slack = |p: &(usize, usize)| obstacles.slack_at(p.1, p.0);
    // Slack is measured to pixel centres; the path check measures to pixel squares, up to half
    // a pixel's diagonal closer.
    let half_diagonal = 0.5 * g.mm.0.hypot(g.mm.1);
    let from_ideal = |p: &(usize, usize)| {
        ((p.0 as f64 - ideal.0 as f64) * g.mm.1).hypot((p.1 as f64 - ideal.1 as f64) * g.mm.0)
    };
    let best = fluid
        .pixels
        .iter()
        .filter(|p| slack(p) >= half_diagonal)
        .min_by(|a, b| from_ideal(a).total_cmp(&from_ideal(b)))
        .or_else(|| {
            fluid
                .pixels
                .iter()
                .max_by(|a, b| slack(a).total_cmp(&slack(b)))
        })?;
    Some([best.1 as f64, best.0 as f64])
}

/// The ideal point of a fluid collection, (row, column): in the middle column of its bounding
/// box `bbox`, [`EFFUSION_ABOVE_FLOOR_MM`] above the deepest fluid pixel of that column, or
/// midway between that column's shallowest and deepest fluid pixels when it is thinner.
fn effusion_point(
    pixels: &[(usize, usize)],
    bbox: (usize, usize, usize, usize),
    mm: (f64, f64),
) -> Option<(usize, usize)> {
    let mid = (bbox.1 + bbox.3) / 2;
    // The column nearest the middle that holds fluid (a crescent may leave its middle empty).
    let column = pixels.iter().map(|p| p.1).min_by_key(|x| x.abs_diff(mid))?;
    let rows = pixels.iter().filter(|p| p.1 == column).map(|p| p.0);
    let (top, floor) = rows.fold((usize::MAX, 0), |(t, f), y| (t.min(y), f.max(y)));
    let up = (EFFUSION_ABOVE_FLOOR_MM / mm.1).round() as usize;
    let row = if floor - top >= up {
        floor - up
    } else {
        (top + floor) / 2
    };
    Some((row, column))
}

/// The column in the middle of the image: the centre beam of a fitted fan, else the middle
/// of the imaging region. Before an injection the sonographer centres the structure to be
/// injected under the probe, so a soft-tissue target is looked for there first.
fn centre_column(g: &Geometry<'_>) -> usize {
    let region = &g.frame.region;
    match &region.fan {
        Some(fan) => fan.apex[0].round().max(0.0) as usize,
        None => (region.bounds.x0 + region.bounds.x1.saturating_sub(1)) / 2,
    }
}

/// The component of `label` the image is centred on: of those crossing the centre column
/// ([`centre_column`]), the largest; when none does, the one coming nearest to it (the larger
/// at equal distance). Returns its pixels and the column nearest the centre that it covers.
fn centred(
    labels: &Array2<u8>,
    label: Label,
    g: &Geometry<'_>,
) -> Option<(Vec<(usize, usize)>, usize)> {
    let centre = centre_column(g);
    let mask = labels.mapv(|l| l == label.code());
    components(&mask)
        .into_iter()
        .map(|c| {
            let column = c
                .pixels
                .iter()
                .map(|p| p.1)
                .min_by_key(|x| x.abs_diff(centre))
                .unwrap_or(centre);
            (column.abs_diff(centre), c.pixels.len(), c.pixels, column)
        })
        .min_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
        .map(|(_, _, pixels, column)| (pixels, column))
}

/// `gap_mm` above the top of the centred component of `label` ([`centred`]), in its column
/// nearest the image's centre.
fn above(labels: &Array2<u8>, label: Label, gap_mm: f64, g: &Geometry<'_>) -> Option<[f64; 2]> {
    let (pixels, cx) = centred(labels, label, g)?;
    let top = pixels.iter().filter(|p| p.1 == cx).map(|p| p.0).min()?;
    let y = top as f64 - gap_mm / g.mm.1;
    (y >= 0.0).then_some([cx as f64, y])
}

/// The pixel of the centred component of `label` ([`centred`]) nearest its centroid.
fn inside(labels: &Array2<u8>, label: Label, g: &Geometry<'_>) -> Option<[f64; 2]> {
    nearest_to_centroid(&centred(labels, label, g)?.0, g.mm)
}
