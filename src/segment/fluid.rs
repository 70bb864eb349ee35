//! Anechoic structures: the joint space (the gap between two bone ends, with the fluid or
//! cartilage in it) and effusions next to bone (label 4), and vessels (label 5): compact
//! anechoic regions away from bone with posterior enhancement.

use ndarray::Array2;

use super::components::{components, open_close};
use crate::label::Label;

/// Joint gaps narrower or wider than these (mm) are not joints.
pub const JOINT_GAP_MM: (f64, f64) = (1.0, 15.0);
/// Inside a gap between bone ends, tissue darker than this multiple of the fluid level is
/// joint (cartilage, capsule and fluid between bone ends are all hypoechoic to the tissue over
/// them; the gap holds no bright tissue but the capsule's edge).
const JOINT_GAP_RATIO: f32 = 1.5;
/// How far above the shallower bone end the joint region starts, mm (cartilage and capsule).
const JOINT_ABOVE_MM: f64 = 1.2;
/// How far below the shallower bone end the recess extends, mm.
const JOINT_BELOW_MM: f64 = 2.5;
/// Effusions are looked for within this depth above the bone surface, mm.
const EFFUSION_REACH_MM: f64 = 4.0;
/// Cartilage over bone, mm: effusions rest on it, not on the bone itself.
const CARTILAGE_MM: f64 = 1.5;
/// Smallest effusion kept, mm².
const EFFUSION_MIN_AREA_MM2: f64 = 1.0;
/// Vessel radius range, mm (as the area of a disc).
const VESSEL_RADIUS_MM: (f64, f64) = (0.6, 5.0);
/// Vessel shape: bounding-box aspect ratio at most, fill at least (a disc fills π/4 = 0.785).
const VESSEL_MAX_ASPECT: f64 = 2.5;
const VESSEL_MIN_FILL: f64 = 0.55;
/// Posterior enhancement: tissue below the vessel at least as bright as beside it (fluid
/// attenuates less than tissue; a small vessel brightens what lies beneath by only a few %).
const ENHANCEMENT_RATIO: f32 = 1.0;
/// Vessel wall, mm: the label includes it.
const VESSEL_WALL_MM: f64 = 0.15;

fn bone_rows(labels: &Array2<u8>) -> Vec<Option<usize>> {
    let (h, w) = labels.dim();
    (0..w)
        .map(|x| (0..h).find(|y| labels[[*y, x]] == Label::Bone.code()))
        .collect()
}

/// Labels joint gaps between bone segments and anechoic effusions over bone.
pub fn label_joint_and_effusion(
    img: &Array2<f32>,
    valid: &Array2<bool>,
    surface: &[Option<f32>],
    mm: (f64, f64),
    fluid_level: f32,
    labels: &mut Array2<u8>,
) {
    let (h, w) = img.dim();
    let mut joint = Array2::from_elem((h, w), false);
    // Gaps between bone runs.
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut x = 0;
    while x < w {
        if surface[x].is_none() {
            x += 1;
            continue;
        }
        let s = x;
        while x < w && surface[x].is_some() {
            x += 1;
        }
        runs.push((s, x - 1));
    }
    for pair in runs.windows(2) {
        let (a_end, b_start) = (pair[0].1, pair[1].0);
        let gap_mm = (b_start - a_end - 1) as f64 * mm.0;
        if gap_mm < JOINT_GAP_MM.0 || gap_mm > JOINT_GAP_MM.1 {
            continue;
        }
        let (Some(ya), Some(yb)) = (surface[a_end], surface[b_start]) else {
            continue;
        };
        let shallow = ya.min(yb) as f64;
        let top = (shallow - JOINT_ABOVE_MM / mm.1).max(0.0) as usize;
        let bottom = ((shallow + JOINT_BELOW_MM / mm.1) as usize).min(h - 1);
        for gx in a_end + 1..b_start {
            for y in top..=bottom {
                if valid[[y, gx]]
                    && labels[[y, gx]] == Label::Background.code()
                    && img[[y, gx]] < JOINT_GAP_RATIO * fluid_level
                {
                    joint[[y, gx]] = true;
                }
            }
        }
    }
    // Anechoic pixels above bone (over its cartilage) or above the joint gap.
    let reach = (EFFUSION_REACH_MM / mm.1) as usize;
    let cartilage = (CARTILAGE_MM / mm.1).ceil() as usize;
    let bone = bone_rows(labels);
    let joint_top: Vec<Option<usize>> = (0..w).map(|x| (0..h).find(|y| joint[[*y, x]])).collect();
    let mut dark = Array2::from_elem((h, w), false);
    for x in 0..w {
        let Some(floor) = bone[x].or(joint_top[x]) else {
            continue;
        };
        for y in floor.saturating_sub(reach + cartilage)..floor.min(h) {
            if valid[[y, x]]
                && labels[[y, x]] == Label::Background.code()
                && img[[y, x]] < fluid_level
            {
                dark[[y, x]] = true;
            }
        }
    }
    let dark = open_close(&dark, 1);
    let min_area = EFFUSION_MIN_AREA_MM2 / (mm.0 * mm.1);
    for c in components(&dark) {
        // It must rest on the joint or on bone's cartilage: its lowest pixel in some column
        // within a cartilage thickness of what lies beneath.
        let touches = c.pixels.iter().any(|&(y, x)| {
            joint[[y, x]]
                || (y + 1 < h && joint[[y + 1, x]])
                || bone[x].is_some_and(|b| b > y && b - y <= cartilage + 2)
                || joint_top[x].is_some_and(|t| t > y && t - y <= cartilage + 2)
        });
        if touches && c.area() as f64 >= min_area {
            for (y, x) in c.pixels {
                joint[[y, x]] = true;
            }
        }
    }
    for ((y, x), j) in joint.indexed_iter() {
        if *j && labels[[y, x]] == Label::Background.code() {
            labels[[y, x]] = Label::Joint.code();
        }
    }
}

/// Labels compact anechoic regions with posterior enhancement, away from bone, as vessels.
pub fn label_vessels(
    img: &Array2<f32>,
    valid: &Array2<bool>,
    mm: (f64, f64),
    fluid_level: f32,
    labels: &mut Array2<u8>,
) {
    let (h, w) = img.dim();
    let dark = Array2::from_shape_fn((h, w), |(y, x)| {
        valid[[y, x]] && labels[[y, x]] == Label::Background.code() && img[[y, x]] < fluid_level
    });
    let dark = open_close(&dark, 1);
    let px_area = mm.0 * mm.1;
    let area_range = (
        std::f64::consts::PI * VESSEL_RADIUS_MM.0.powi(2) / px_area,
        std::f64::consts::PI * VESSEL_RADIUS_MM.1.powi(2) / px_area,
    );
    let wall = (VESSEL_WALL_MM / mm.1).ceil().max(1.0) as usize;
    for c in components(&dark) {
        let area = c.area() as f64;
        if area < area_range.0 || area > area_range.1 {
            continue;
        }
        let (eh, ew) = c.extent();
        let (eh_mm, ew_mm) = (eh as f64 * mm.1, ew as f64 * mm.0);
        if eh_mm.max(ew_mm) / eh_mm.min(ew_mm).max(1e-9) > VESSEL_MAX_ASPECT
            || c.fill() < VESSEL_MIN_FILL
        {
            continue;
        }
        // A vessel cut by the image's side is still a vessel (and still an obstacle); only
        // one that touches another label is not judged.
        let (_, x0, y1, x1) = c.bbox;
        let near_label = c.pixels.iter().any(|&(y, x)| {
            (y.saturating_sub(wall + 1)..(y + wall + 2).min(h))
                .any(|yy| labels[[yy, x]] != Label::Background.code())
        });
        if near_label {
            continue;
        }
        // Posterior enhancement: the band 0.5–3 mm below, against bands of the same depth beside.
        let (b0, b1) = (
            y1 + (0.5 / mm.1) as usize,
            (y1 + (3.0 / mm.1) as usize).min(h - 1),
        );
        if b0 >= b1 {
            continue;
        }
        let band_mean = |xa: usize, xb: usize| -> Option<f32> {
            let (mut s, mut n) = (0.0f32, 0usize);
            for y in b0..=b1 {
                for x in xa..xb.min(w) {
                    if valid[[y, x]] && labels[[y, x]] == Label::Background.code() {
                        s += img[[y, x]];
                        n += 1;
                    }
                }
            }
            (n > 0).then(|| s / n as f32)
        };
        let Some(below) = band_mean(x0, x1 + 1) else {
            continue;
        };
        let side = ew.max(2);
        let left = band_mean(x0.saturating_sub(2 * side), x0.saturating_sub(side));
        let right = band_mean(x1 + 1 + side, x1 + 1 + 2 * side);
        let beside: Vec<f32> = [left, right].into_iter().flatten().collect();
        if beside.is_empty() {
            continue;
        }
        let beside = beside.iter().sum::<f32>() / beside.len() as f32;
        if below < ENHANCEMENT_RATIO * beside {
            continue;
        }
        // The lumen and its wall: the component grown by the wall thickness.
        for &(y, x) in &c.pixels {
            for yy in y.saturating_sub(wall)..(y + wall + 1).min(h) {
                for xx in x.saturating_sub(wall)..(x + wall + 1).min(w) {
                    if valid[[yy, xx]] && labels[[yy, xx]] == Label::Background.code() {
                        labels[[yy, xx]] = Label::Vessel.code();
                    }
                }
            }
        }
    }
}
