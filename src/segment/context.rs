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
//! On the GPU ([`classify_gpu`]) both stages and the context (`kernels::context`, whose CPU
//! twin is [`context_features`]) run in one chain, from one upload to one read-back.

use rayon::prelude::*;

use super::pixels::{self, box_means_into, px, valid_counts, PixelModel, CLASSES, FEATURES};
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
/// `probs` (the first stage's probabilities, class-major). `base` is extended in place (it
/// is the first `FEATURES` planes of the result).
pub fn context_features(f: &Features, mut base: Vec<f32>, probs: &[f32]) -> Vec<f32> {
    let (h, w) = f.intensity.dim();
    let n = h * w;
    base.truncate(FEATURES * n);
    base.resize(INPUTS * n, 0.0);
    let mut out = base;
    if n == 0 {
        return out;
    }
    let m: Vec<f32> = f.valid.iter().map(|v| f32::from(u8::from(*v))).collect();
    let (mmx, mmy) = f.mm_per_px;
    let window = |mm: f64| (px(mm, mmy, 1), px(mm, mmx, 1));
    let near = window(NEAR_MM);
    let far = window(FAR_MM);
    let (near_share, far_share) = rayon::join(
        || valid_counts(&m, h, w, near.0, near.1),
        || valid_counts(&m, h, w, far.0, far.1),
    );
    // The planes after the base: 7 probabilities, 7 near means, 7 far means, then per offset
    // label its above / below / side-min / side-max.
    let (_, context) = out.split_at_mut(FEATURES * n);
    let (p_planes, rest) = context.split_at_mut(CLASSES * n);
    let (near_planes, rest) = rest.split_at_mut(CLASSES * n);
    let (far_planes, offset_planes) = rest.split_at_mut(CLASSES * n);
    // The first stage's probabilities on the valid pixels (outside, 0 for every class), and
    // their window means, one class per task.
    p_planes
        .par_chunks_mut(n)
        .zip(near_planes.par_chunks_mut(n))
        .zip(far_planes.par_chunks_mut(n))
        .enumerate()
        .for_each(|(k, ((pk, near_k), far_k))| {
            for ((o, v), m) in pk.iter_mut().zip(&probs[k * n..(k + 1) * n]).zip(&m) {
                *o = v * m;
            }
            box_means_into(pk, &near_share, h, w, near, near_k);
            box_means_into(pk, &far_share, h, w, far, far_k);
        });
    let near_planes: &[f32] = near_planes;
    let (dy, dx) = (px(OFFSET_MM, mmy, 1), px(OFFSET_MM, mmx, 1));
    offset_planes
        .par_chunks_mut(4 * n)
        .zip(OFFSET_LABELS.par_iter())
        .for_each(|(planes, label)| {
            let k = label.code() as usize;
            let near_mean = &near_planes[k * n..(k + 1) * n];
            let (above, rest) = planes.split_at_mut(n);
            let (below, rest) = rest.split_at_mut(n);
            let (side_min, side_max) = rest.split_at_mut(n);
            offset_reads(near_mean, h, w, dy, dx, [above, below, side_min, side_max]);
        });
    out
}

/// The reads of `map` (row-major `h × w`) `dy` rows above and below every pixel and the
/// smaller and larger of the reads `dx` columns to either side; outside the grid reads 0.
/// The planes start zeroed.
fn offset_reads(
    map: &[f32],
    h: usize,
    w: usize,
    dy: usize,
    dx: usize,
    [above, below, side_min, side_max]: [&mut [f32]; 4],
) {
    for y in dy..h {
        above[y * w..(y + 1) * w].copy_from_slice(&map[(y - dy) * w..(y - dy + 1) * w]);
        below[(y - dy) * w..(y - dy + 1) * w].copy_from_slice(&map[y * w..(y + 1) * w]);
    }
    for ((row, lo), hi) in map
        .chunks_exact(w)
        .zip(side_min.chunks_exact_mut(w))
        .zip(side_max.chunks_exact_mut(w))
    {
        for x in 0..w {
            let l = if x >= dx { row[x - dx] } else { 0.0 };
            let r = if x + dx < w { row[x + dx] } else { 0.0 };
            lo[x] = l.min(r);
            hi[x] = l.max(r);
        }
    }
}

/// The second stage shipped with this build (`models/pixel_context.json`), checked against
/// this build's inputs and labels.
pub fn builtin_model() -> crate::Result<&'static PixelModel> {
    static MODEL: pixels::ModelCell = std::sync::OnceLock::new();
    pixels::load_builtin(
        &MODEL,
        include_str!("../../models/pixel_context.json"),
        &input_names(),
        "models/pixel_context.json",
    )
}

/// Both stages: the first stage's probabilities from `f`'s features, then the second's from
/// them and their context. `run` is the inference (CPU twin or shader) for one model and its
/// feature-major inputs. Returns the second stage's probabilities, then the first's.
pub fn classify(
    f: &Features,
    mut run: impl FnMut(&PixelModel, &[f32]) -> crate::Result<Vec<f32>>,
) -> crate::Result<(Vec<f32>, Vec<f32>)> {
    let base = pixels::pixel_features_with_room(f, CONTEXT);
    let first = run(pixels::builtin_model()?, &base)?;
    let second = builtin_model()?;
    let inputs = context_features(f, base, &first);
    Ok((run(second, &inputs)?, first))
}

/// Planes of the GPU chain ([`classify_gpu`]), each `h·w` values. The uploaded image holds
/// the first stage's features, then the validity.
#[cfg(feature = "gpu")]
const VALID_PLANE: usize = FEATURES;
/// The other image: the context (the second stage's inputs after the features), then the first
/// stage's probabilities, then the second's (the two read back together).
#[cfg(feature = "gpu")]
const PROBS_PLANE: usize = CONTEXT;
#[cfg(feature = "gpu")]
const SECOND_PLANE: usize = CONTEXT + CLASSES;
/// Planes per image of the chain.
#[cfg(feature = "gpu")]
const CHAIN_PLANES: usize = CONTEXT + 2 * CLASSES;

/// The two stages' values as a GPU chain takes them at the start of `aux`, where the second
/// stage's begin, and the first whole plane after them (the context's scratch).
#[cfg(feature = "gpu")]
pub struct GpuModels {
    /// Both models, the first stage's then the second's ([`PixelModel::flat`]).
    pub values: Vec<f32>,
    /// Offset of the second stage's values.
    pub second_at: usize,
    /// Offset of the first plane of `aux` after the models.
    pub scratch: usize,
}

#[cfg(feature = "gpu")]
impl GpuModels {
    /// The shipped models laid out for a chain of [`CHAIN_PLANES`] planes of a `w × h` grid.
    pub fn for_grid(w: usize, h: usize) -> crate::Result<GpuModels> {
        let n = h * w;
        let error = |reason: String| crate::gpu::GpuError::Kernel {
            kernel: "context".into(),
            reason,
        };
        if n == 0 {
            return Err(error("an empty grid".into()).into());
        }
        let (first, second) = (pixels::builtin_model()?.flat(), builtin_model()?.flat());
        let second_at = first.len();
        let mut values = first;
        values.extend(second);
        // The scratch starts at the first whole plane after the models.
        let scratch = values.len().div_ceil(n) * n;
        let needed = (crate::kernels::context::scratch_planes(CLASSES) * n)
            .max(pixels::gpu_feature_scratch(w, h));
        if scratch + needed > CHAIN_PLANES * n {
            return Err(error(format!(
                "{} model values do not fit a {w}x{h} grid",
                values.len()
            ))
            .into());
        }
        Ok(GpuModels {
            values,
            second_at,
            scratch,
        })
    }
}

/// Planes of a GPU chain for the classifier (each the grid's `w·h` values).
#[cfg(feature = "gpu")]
pub const GPU_CHAIN_PLANES: usize = CHAIN_PLANES;
/// The plane of the chain's current image at the end of [`encode_stages`] where the first
/// stage's probabilities begin (the second's follow).
#[cfg(feature = "gpu")]
pub const GPU_PROBS_PLANE: usize = PROBS_PLANE;
/// Planes before [`GPU_PROBS_PLANE`] that [`encode_stages`] leaves free at its end (the
/// context's, used up by then).
#[cfg(feature = "gpu")]
pub const GPU_FREE_BEFORE_PROBS: usize = CONTEXT;

/// Queues both stages and the context on a chain of [`CHAIN_PLANES`] planes of a `w × h` grid
/// (`w` the chain's width) whose current image holds the first stage's features in planes
/// `0..FEATURES` and the validity in the plane after them, and whose `aux` holds `models`
/// ([`GpuModels`], written by the caller). The chain ends on the image whose planes from
/// [`GPU_PROBS_PLANE`] hold the first stage's probabilities, then the second's.
#[cfg(feature = "gpu")]
pub fn encode_stages(
    chain: &mut crate::gpu::GpuChain<'_>,
    h: usize,
    (mmx, mmy): (f64, f64),
    models: &GpuModels,
) -> crate::Result<()> {
    use crate::kernels::pixel_mlp::{encode, Placement};
    let (first, second) = (pixels::builtin_model()?, builtin_model()?);
    let w = chain.width();
    let n = w * h;
    let u = |v: usize| v as u32;
    encode(
        chain,
        first,
        n,
        Placement {
            model: 0,
            split: u(FEATURES),
            ctx_plane: 0,
            out_plane: u(PROBS_PLANE),
        },
        false,
    )?;
    let window = |mm: f64| (px(mm, mmy, 1), px(mm, mmx, 1));
    let (near, far) = (window(NEAR_MM), window(FAR_MM));
    let label = |j: usize| u32::from(OFFSET_LABELS[j].code());
    let params = crate::kernels::context::Params {
        w: u(w),
        h: u(h),
        n: u(n),
        classes: u(CLASSES),
        near_ry: u(near.0),
        near_rx: u(near.1),
        far_ry: u(far.0),
        far_rx: u(far.1),
        dy: u(px(OFFSET_MM, mmy, 1)),
        dx: u(px(OFFSET_MM, mmx, 1)),
        valid_plane: u(VALID_PLANE),
        probs_plane: u(PROBS_PLANE),
        ctx_plane: 0,
        scratch: u(models.scratch),
        label0: label(0),
        label1: label(1),
        label2: label(2),
        label3: label(3),
        label4: label(4),
        pad: 0,
    };
    crate::kernels::context::encode(chain, &params)?;
    encode(
        chain,
        second,
        n,
        Placement {
            model: u(models.second_at),
            split: u(FEATURES),
            ctx_plane: 0,
            out_plane: u(SECOND_PLANE),
        },
        true,
    )?;
    Ok(())
}

/// Both stages on the GPU in one chain: the first stage's features and the validity go up
/// once, the first stage, the context and the second stage run there, and both stages'
/// probabilities come back in one read-back. Returns the second stage's probabilities, then
/// the first's, as [`classify`] does (the context's sums differ from the CPU twin's by
/// rounding only).
#[cfg(feature = "gpu")]
pub fn classify_gpu(
    ctx: &crate::gpu::GpuContext,
    f: &Features,
) -> crate::Result<(Vec<f32>, Vec<f32>)> {
    use crate::kernels::pixel_mlp::mask_invalid;
    let (h, w) = f.intensity.dim();
    let n = h * w;
    let models = GpuModels::for_grid(w, h)?;
    let mut up = pixels::pixel_features_with_room(f, 1);
    up.extend(f.valid.iter().map(|v| f32::from(u8::from(*v))));
    let mut chain = ctx.begin_planes(&up, w, CHAIN_PLANES * h)?;
    chain.write_aux(&models.values)?;
    encode_stages(&mut chain, h, f.mm_per_px, &models)?;
    let mut both = chain.finish_range(PROBS_PLANE * n, 2 * CLASSES * n)?;
    let mut second_probs = both.split_off(CLASSES * n);
    let mut first_probs = both;
    mask_invalid(&mut first_probs, CLASSES, &f.valid);
    mask_invalid(&mut second_probs, CLASSES, &f.valid);
    Ok((second_probs, first_probs))
}
