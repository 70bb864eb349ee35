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
            TargetKind::Intratendinous => inside(&seg.labels, Label::Tendon, g.mm),
            TargetKind::Perineural => above(
                &seg.labels,
                Label::Nerve,
                params.nerve_margin_mm + PERINEURAL_EXTRA_MM,
                g,
            ),
            TargetKind::User => None,
        };
        t.map(|t| (t, kind))
    })
}

/// Columns holding bone.
fn bone_columns(labels: &Array2<u8>) -> Vec<bool> {
    let (h, w) = labels.dim();
    (0..w)
        .map(|x| (0..h).any(|y| labels[[y, x]] == Label::Bone.code()))
        .collect()
}

/// Whether a joint/effusion pixel in column `x` lies between bone ends (a joint space) rather
/// than over bone (an effusion).
fn between_bones(bone_cols: &[bool], x: usize) -> bool {
    let first = bone_cols.iter().position(|b| *b);
    let last = bone_cols.iter().rposition(|b| *b);
    !bone_cols[x] && matches!((first, last), (Some(a), Some(b)) if x > a && x < b)
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
fn joint_space(labels: &Array2<u8>, mm: (f64, f64)) -> Option<[f64; 2]> {
    let bone_cols = bone_columns(labels);
    let joint: Vec<(usize, usize)> = labels
        .indexed_iter()
        .filter(|((_, x), l)| **l == Label::Joint.code() && between_bones(&bone_cols, *x))
        .map(|(p, _)| p)
        .collect();
    (!joint.is_empty())
        .then(|| nearest_to_centroid(&joint, mm))
        .flatten()
}

/// The deepest point of an effusion (label 4 not between bone ends, in a collection deep
/// enough for a needle tip) that keeps every margin; else the one with the most room.
fn effusion(
    seg: &Segmentation,
    g: &Geometry<'_>,
    params: &PlanParams,
    obstacles: &mut Option<Obstacles>,
) -> Option<[f64; 2]> {
    let labels = &seg.labels;
    let bone_cols = bone_columns(labels);
    let mask = Array2::from_shape_fn(labels.dim(), |(y, x)| {
        labels[[y, x]] == Label::Joint.code() && !between_bones(&bone_cols, x)
    });
    let min_rows = EFFUSION_MIN_DEPTH_MM / g.mm.1;
    let fluid: Vec<(usize, usize)> = components(&mask)
        .into_iter()
        .filter(|c| c.extent().0 as f64 >= min_rows)
        .flat_map(|c| c.pixels)
        .collect();
    if fluid.is_empty() {
        return None;
    }
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
    let best = fluid
        .iter()
        .filter(|p| slack(p) >= half_diagonal)
        .max_by_key(|p| p.0)
        .or_else(|| fluid.iter().max_by(|a, b| slack(a).total_cmp(&slack(b))))?;
    Some([best.1 as f64, best.0 as f64])
}

/// The largest component of `label`.
fn largest(labels: &Array2<u8>, label: Label) -> Option<Vec<(usize, usize)>> {
    let mask = labels.mapv(|l| l == label.code());
    components(&mask)
        .into_iter()
        .max_by_key(|c| c.pixels.len())
        .map(|c| c.pixels)
}

/// `gap_mm` above the top of the largest component of `label`, over its centroid column.
fn above(labels: &Array2<u8>, label: Label, gap_mm: f64, g: &Geometry<'_>) -> Option<[f64; 2]> {
    let pixels = largest(labels, label)?;
    let cx =
        (pixels.iter().map(|p| p.1 as f64).sum::<f64>() / pixels.len() as f64).round() as usize;
    let top = pixels.iter().filter(|p| p.1 == cx).map(|p| p.0).min()?;
    let y = top as f64 - gap_mm / g.mm.1;
    (y >= 0.0).then_some([cx as f64, y])
}

/// The pixel of the largest component of `label` nearest its centroid.
fn inside(labels: &Array2<u8>, label: Label, mm: (f64, f64)) -> Option<[f64; 2]> {
    nearest_to_centroid(&largest(labels, label)?, mm)
}
