//! The pixel classifier's second stage (auto-context): a second perceptron sees, beside the
//! first stage's own features, the first stage's class probabilities around each pixel, so
//! that a decision can use what surrounds it up to a few millimetres away (a dark patch with
//! bone under it is joint fluid; one in the middle of soft tissue with a wall is a vessel; a
//! nerve is round, with tissue on both sides). Tu and Bai, "Auto-context and its application
//! to high-level vision tasks and 3D brain image segmentation", IEEE TPAMI 32(10), 2010.
//!
//! Every window is in millimetres, like the first stage's. The probabilities are averaged
//! over the valid pixels only, and a window or offset outside the grid reads 0.
//!
//! Both stages run with the same inference code (`kernels::pixel_mlp`, CPU twin and shader);
//! the shipped second stage is `models/pixel_context.json` (model card: `models/README.md`).

use rayon::prelude::*;

use super::pixels::{self, box_means, box_sums, px, PixelModel, CLASSES, FEATURES};
use super::Features;
use crate::label::Label;

/// Context inputs added to the first stage's features.
pub const CONTEXT: usize = 41;
/// Inputs of the second stage: the first stage's features, then the context.
pub const INPUTS: usize = FEATURES + CONTEXT;

/// Radius of the near context window, mm (about a small vessel's or nerve's radius).
const NEAR_MM: f64 = 1.5;
/// Radius of the far context window, mm.
const FAR_MM: f64 = 4.0;
/// Offset of the above / below / beside reads, mm (beyond a nerve's or small vessel's
/// diameter of 1.5–5 mm, so that they fall on what surrounds it).
const OFFSET_MM: f64 = 4.0;

/// The labels whose surroundings are read at an offset.
const OFFSET_LABELS: [Label; 5] = [
    Label::Tendon,
    Label::Bone,
    Label::Joint,
    Label::Vessel,
    Label::Nerve,
];

/// The context inputs' names, in order.
pub const CONTEXT_NAMES: [&str; CONTEXT] = [
    "p_background",
    "p_tendon",
    "p_bone",
    "p_shadow",
    "p_joint",
    "p_vessel",
    "p_nerve",
    "p_mean_1.5mm_background",
    "p_mean_1.5mm_tendon",
    "p_mean_1.5mm_bone",
    "p_mean_1.5mm_shadow",
    "p_mean_1.5mm_joint",
    "p_mean_1.5mm_vessel",
    "p_mean_1.5mm_nerve",
    "p_mean_4mm_background",
    "p_mean_4mm_tendon",
    "p_mean_4mm_bone",
    "p_mean_4mm_shadow",
    "p_mean_4mm_joint",
    "p_mean_4mm_vessel",
    "p_mean_4mm_nerve",
    "p_above_4mm_tendon",
    "p_below_4mm_tendon",
    "p_side_min_4mm_tendon",
    "p_side_max_4mm_tendon",
    "p_above_4mm_bone",
    "p_below_4mm_bone",
    "p_side_min_4mm_bone",
    "p_side_max_4mm_bone",
    "p_above_4mm_joint",
    "p_below_4mm_joint",
    "p_side_min_4mm_joint",
    "p_side_max_4mm_joint",
    "p_above_4mm_vessel",
    "p_below_4mm_vessel",
    "p_side_min_4mm_vessel",
    "p_side_max_4mm_vessel",
    "p_above_4mm_nerve",
    "p_below_4mm_nerve",
    "p_side_min_4mm_nerve",
    "p_side_max_4mm_nerve",
];

/// The second stage's input names: the first stage's, then the context's.
pub fn input_names() -> Vec<&'static str> {
    pixels::FEATURE_NAMES
        .iter()
        .chain(CONTEXT_NAMES.iter())
        .copied()
        .collect()
}

/// The second stage's inputs for every grid pixel, feature-major (`INPUTS × h·w`): `base`
/// (the first stage's features, [`pixels::pixel_features`]) followed by the context of
/// `probs` (the first stage's probabilities, class-major).
pub fn context_features(f: &Features, base: &[f32], probs: &[f32]) -> Vec<f32> {
    let (h, w) = f.intensity.dim();
    let n = h * w;
    let mut out = Vec::with_capacity(INPUTS * n);
    out.extend_from_slice(&base[..FEATURES * n]);
    if n == 0 {
        out.resize(INPUTS * n, 0.0);
        return out;
    }
    let m: Vec<f32> = f.valid.iter().map(|v| f32::from(u8::from(*v))).collect();
    // The first stage's probabilities on the valid pixels (outside, 0 for every class).
    let p: Vec<Vec<f32>> = (0..CLASSES)
        .map(|k| {
            probs[k * n..(k + 1) * n]
                .iter()
                .zip(&m)
                .map(|(v, m)| v * m)
                .collect()
        })
        .collect();
    for pk in &p {
        out.extend_from_slice(pk);
    }
    let (mmx, mmy) = f.mm_per_px;
    let window = |mm: f64| (px(mm, mmy, 1), px(mm, mmx, 1));
    let near = window(NEAR_MM);
    let far = window(FAR_MM);
    let (near_share, far_share) = rayon::join(
        || box_sums(&m, h, w, near.0, near.1),
        || box_sums(&m, h, w, far.0, far.1),
    );
    let means: Vec<(Vec<f32>, Vec<f32>)> = p
        .par_iter()
        .map(|pk| {
            (
                box_means(pk, &near_share, h, w, near.0, near.1),
                box_means(pk, &far_share, h, w, far.0, far.1),
            )
        })
        .collect();
    for (near_mean, _) in &means {
        out.extend_from_slice(near_mean);
    }
    for (_, far_mean) in &means {
        out.extend_from_slice(far_mean);
    }
    let (dy, dx) = (px(OFFSET_MM, mmy, 1), px(OFFSET_MM, mmx, 1));
    for label in OFFSET_LABELS {
        let near_mean = &means[label.code() as usize].0;
        let at = |y: usize, x: usize, oy: isize, ox: isize| -> f32 {
            let (yy, xx) = (y as isize + oy, x as isize + ox);
            if yy < 0 || xx < 0 || yy >= h as isize || xx >= w as isize {
                0.0
            } else {
                near_mean[yy as usize * w + xx as usize]
            }
        };
        let (dy, dx) = (dy as isize, dx as isize);
        let start = out.len();
        out.resize(start + 4 * n, 0.0);
        let (above, rest) = out[start..].split_at_mut(n);
        let (below, rest) = rest.split_at_mut(n);
        let (side_min, side_max) = rest.split_at_mut(n);
        for y in 0..h {
            for x in 0..w {
                let i = y * w + x;
                above[i] = at(y, x, -dy, 0);
                below[i] = at(y, x, dy, 0);
                let (l, r) = (at(y, x, 0, -dx), at(y, x, 0, dx));
                side_min[i] = l.min(r);
                side_max[i] = l.max(r);
            }
        }
    }
    out
}

/// The second stage shipped with this build (`models/pixel_context.json`), checked against
/// this build's inputs and labels.
pub fn builtin_model() -> crate::Result<&'static PixelModel> {
    static MODEL: std::sync::OnceLock<Result<PixelModel, String>> = std::sync::OnceLock::new();
    MODEL
        .get_or_init(|| {
            PixelModel::from_json(
                include_str!("../../models/pixel_context.json"),
                &input_names(),
                &pixels::class_names(),
            )
            .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|reason| {
            crate::kernels::KernelError::InvalidParameter {
                name: "models/pixel_context.json",
                reason: reason.clone(),
            }
            .into()
        })
}

/// Both stages: the first stage's probabilities from `f`'s features, then the second's from
/// them and their context. `run` is the inference (CPU twin or shader) for one model and its
/// feature-major inputs. Returns the second stage's probabilities, then the first's.
pub fn classify(
    f: &Features,
    mut run: impl FnMut(&PixelModel, &[f32]) -> crate::Result<Vec<f32>>,
) -> crate::Result<(Vec<f32>, Vec<f32>)> {
    let base = pixels::pixel_features(f);
    let first = run(pixels::builtin_model()?, &base)?;
    let second = builtin_model()?;
    let inputs = context_features(f, &base, &first);
    Ok((run(second, &inputs)?, first))
}
