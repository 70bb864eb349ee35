//! The pixel classifier: per analysis-grid pixel, a small multilayer perceptron over
//! hand-made, gain-invariant features gives the probability of each label.
//!
//! Features (see [`FEATURE_NAMES`]) are computed on the frame's rank transform (each
//! despeckled value replaced by its share of the frame's valid pixels that are darker), so a
//! gain change or another dynamic range, which move grey levels monotonically, leave them
//! almost unchanged. Window sizes are in millimetres, so probes and depths of any pixel size
//! give the same features. Around each pixel they describe brightness at three scales,
//! texture, elongation along and across the beam, what lies above (the brightest reflector
//! higher in the column: shadows) and beneath (a reflector a few millimetres down: fluid
//! over bone), the depth, and the feature kernels' outputs (phase symmetry, coherence, the
//! mean beneath).
//!
//! The weights are trained by `sonoguide train-pixels` (the harness's training) on simulated
//! frames of the tuning sets, read through the DICOM reader; the shipped model is
//! `models/pixel_mlp.json`, described in `models/README.md`. Inference runs on the CPU
//! (`kernels::pixel_mlp::cpu`) and as the `pixel_mlp.wgsl` compute shader on the GPU.

use ndarray::Array2;
use rayon::prelude::*;

use super::Features;
pub(crate) use crate::kernels::box_means::{box_means, box_means_into, valid_counts};
pub use crate::kernels::pixel_mlp::{self, Dense, ModelError, PixelModel, MAX_WIDTH};
use crate::label::Label;

/// Number of features per pixel.
pub const FEATURES: usize = 22;
/// Number of classes (every label, background included, in code order).
pub const CLASSES: usize = Label::ALL.len();

/// The features, in the order of the model's inputs.
pub const FEATURE_NAMES: [&str; FEATURES] = [
    "rank",
    "rank_mean_0.5mm",
    "rank_mean_1.5mm",
    "rank_mean_4mm",
    "rank_std_1mm",
    "rank_mean_wide_3x0.4mm",
    "rank_mean_tall_0.4x3mm",
    "above_mean_0.5-3mm",
    "below_mean_0.5-3mm",
    "above_max_from_1mm",
    "below_max_0.5-8mm",
    "below_mean_from_1mm",
    "depth_30mm",
    "phase_symmetry",
    "coherence",
    "coherence_horizontal",
    "shadow_kernel_rank",
    "above_mean_all",
    "ridge_1mm",
    "valid_share_1.5mm",
    "rank_mean_2.5mm",
    "rank_mean_8mm",
];

/// Depth scale of the depth feature, mm (the middle of MSK imaging depths).
const DEPTH_SCALE_MM: f64 = 30.0;

/// |cos θ| for an orientation θ in [−π/2, π/2] (the coherence kernel's range), to about 1e-3
/// (Taylor series to the 8th power; angles outside are folded in first).
fn abs_cos(theta: f32) -> f32 {
    use std::f32::consts::{FRAC_PI_2, PI};
    let mut t = theta.abs() % PI;
    if t > FRAC_PI_2 {
        t = PI - t;
    }
    let t2 = t * t;
    let c = 1.0 - t2 / 2.0 * (1.0 - t2 / 12.0 * (1.0 - t2 / 30.0 * (1.0 - t2 / 56.0)));
    c.clamp(0.0, 1.0)
}

/// Pixels of `mm` millimetres at `mm_per_px`, at least `min`.
pub(crate) fn px(mm: f64, mm_per_px: f64, min: usize) -> usize {
    ((mm / mm_per_px).round() as usize).max(min)
}

/// The half-sizes (rows, columns) of the rank's window means at `mm` per pixel (x, y): 0.5,
/// 1 (with the mean square), 1.5 (with the valid share), 4 mm, wide 3 × 0.4 mm, tall 0.4 × 3
/// mm, 2.5 and 8 mm.
fn windows((mmx, mmy): (f64, f64)) -> [(usize, usize); 8] {
    let r = |mm: f64| (px(mm, mmy, 1), px(mm, mmx, 1));
    [
        r(0.5),
        r(1.0),
        r(1.5),
        r(4.0),
        (px(0.4, mmy, 1), px(3.0, mmx, 1)),
        (px(3.0, mmy, 1), px(0.4, mmx, 1)),
        r(2.5),
        r(8.0),
    ]
}

/// The feature planes of the window means of [`windows`], in order.
#[cfg(feature = "gpu")]
const WINDOW_PLANES: [usize; 8] = [1, 4, 2, 3, 5, 6, 20, 21];

/// The column features' reaches at `mmy` mm per row.
fn reach(mmy: f64) -> crate::kernels::columns::Reach {
    crate::kernels::columns::Reach {
        d05: px(0.5, mmy, 1),
        d1: px(1.0, mmy, 1),
        d3: px(3.0, mmy, 2),
        d8: px(8.0, mmy, 2),
    }
}

/// The planes of the current image [`encode_features`] reads: the analysis grid's intensity,
/// then the feature maps (phase symmetry, the mean beneath, coherence, orientation). The maps
/// lie beyond every plane the features and the classifier write, so that they can be read
/// back with the classifier's result.
#[cfg(feature = "gpu")]
pub const GPU_MAPS: [usize; 5] = {
    use crate::kernels::features::MAPS_AT;
    [0, MAPS_AT, MAPS_AT + 1, MAPS_AT + 2, MAPS_AT + 3]
};
/// The plane of the current image holding the validity (1 or 0), read by
/// [`encode_features`] and left in place for the classifier (its plane after the features).
#[cfg(feature = "gpu")]
pub const GPU_VALID: usize = FEATURES;
/// The plane of the current image [`encode_features`] needs filled with ones.
#[cfg(feature = "gpu")]
pub const GPU_ONES: usize = FEATURES + 1;
/// Planes each image of [`encode_features`]'s chain must hold.
#[cfg(feature = "gpu")]
pub const GPU_FEATURE_PLANES: usize = 32;

/// Scratch values [`encode_features`] uses in `aux` for a grid of `w × h`.
#[cfg(feature = "gpu")]
pub fn gpu_feature_scratch(w: usize, h: usize) -> usize {
    crate::kernels::columns::scratch(w, h).max(2 * w * h)
}

/// Queues the [`FEATURES`] pixel features of a `w × h` analysis grid (`w` the chain's width)
/// on a chain whose current image holds the grid and its feature maps in the planes
/// [`GPU_MAPS`], the validity in [`GPU_VALID`] and ones in [`GPU_ONES`]: the rank transform,
/// the window means, the column features, then the rest put together
/// (`shaders/features.wgsl`). The features land in planes `0..FEATURES` of the current image
/// (the validity stays where it was, after them: the classifier's layout); the next image's
/// planes up to [`GPU_FEATURE_PLANES`] and [`gpu_feature_scratch`] values of `aux` from
/// `scratch` are used on the way. The CPU twin is [`pixel_features`].
#[cfg(feature = "gpu")]
pub fn encode_features(
    chain: &mut crate::gpu::GpuChain<'_>,
    h: usize,
    mm_per_px: (f64, f64),
    scratch: usize,
) -> crate::Result<()> {
    use crate::kernels::features::{COLUMNS_AT, MEAN_SQUARE_AT, SQUARE_IN, SQUARE_OUT};
    use crate::kernels::{box_means, columns, rank, Planes};
    let w = chain.width();
    let n = w * h;
    if n == 0 || chain.height() < GPU_FEATURE_PLANES * h {
        return Err(crate::kernels::KernelError::InvalidParameter {
            name: "pixel features",
            reason: format!(
                "a chain of {} rows does not hold {GPU_FEATURE_PLANES} planes of {h} rows",
                chain.height()
            ),
        }
        .into());
    }
    // The current image's free planes: the rank's (later its 0.5 mm mean's) and its square's.
    const RANK_IN: usize = SQUARE_IN;
    const SQUARED_IN: usize = 20;
    let at = |values: usize, valid: usize, out: usize| Planes {
        values: values * n,
        valid: valid * n,
        scratch,
        out: out * n,
    };
    let [intensity, _, below, _, _] = GPU_MAPS;
    rank::encode(chain, h, at(intensity, GPU_VALID, 0))?;
    // The mean beneath through the intensity's ranks, on every pixel (as the twin).
    rank::map_again(chain, h, at(below, GPU_ONES, 16))?;
    chain.copy_to_current(0, RANK_IN * n, n)?;
    crate::kernels::features::encode_square(chain, n)?;
    chain.copy_to_current(SQUARE_OUT * n, SQUARED_IN * n, n)?;
    let wins = windows(mm_per_px);
    for (&win, &plane) in wins.iter().zip(&WINDOW_PLANES) {
        box_means::encode(chain, h, win, at(RANK_IN, GPU_VALID, plane))?;
    }
    box_means::encode(chain, h, wins[1], at(SQUARED_IN, GPU_VALID, MEAN_SQUARE_AT))?;
    // The valid share: the validity's mean over the whole window.
    box_means::encode(chain, h, wins[2], at(GPU_VALID, GPU_ONES, 19))?;
    chain.copy_to_current(n, RANK_IN * n, n)?;
    columns::encode(
        chain,
        h,
        reach(mm_per_px.1),
        at(RANK_IN, GPU_VALID, COLUMNS_AT),
    )?;
    let depth_step = (mm_per_px.1 / DEPTH_SCALE_MM) as f32;
    crate::kernels::features::encode_assemble(chain, n, depth_step)?;
    chain.copy_to_current(0, 0, FEATURES * n)?;
    Ok(())
}

/// Per window: the mean rank, its mean square (1 mm only) and the window sums of validity.
type WindowMaps = (Vec<f32>, Option<Vec<f32>>, Vec<f32>);

/// The feature vectors of every grid pixel, feature-major (`FEATURES × h·w`, row-major
/// pixels). Invalid pixels get features too (they are not classified).
pub fn pixel_features(f: &Features) -> Vec<f32> {
    pixel_features_with_room(f, 0)
}

/// [`pixel_features`] in a vector with room for `planes` more planes after them (the second
/// stage's context is added in place, without a copy of these).
pub fn pixel_features_with_room(f: &Features, planes: usize) -> Vec<f32> {
    let (h, w) = f.intensity.dim();
    let n = h * w;
    let mut out = Vec::with_capacity((FEATURES + planes) * n);
    out.resize(FEATURES * n, 0f32);
    if n == 0 {
        return out;
    }
    let mmy = f.mm_per_px.1;
    let valid: Vec<bool> = f.valid.iter().copied().collect();
    let m: Vec<f32> = valid.iter().map(|v| if *v { 1.0 } else { 0.0 }).collect();
    let rank = crate::kernels::rank::RankMap::of(&f.intensity, &f.valid);
    let u: Vec<f32> = f
        .intensity
        .iter()
        .zip(&valid)
        .map(|(v, ok)| if *ok { rank.map(*v) } else { 0.0 })
        .collect();
    let uu: Vec<f32> = u.iter().map(|v| v * v).collect();
    let windows = windows(f.mm_per_px);
    // Per window: the mean rank, and for 1 mm the mean square and for 1.5 mm the valid share.
    let maps: Vec<WindowMaps> = windows
        .par_iter()
        .enumerate()
        .map(|(i, &(ry, rx))| {
            let ms = valid_counts(&m, h, w, ry, rx);
            let mean = box_means(&u, &ms, h, w, ry, rx);
            let square = (i == 1).then(|| box_means(&uu, &ms, h, w, ry, rx));
            (mean, square, ms)
        })
        .collect();
    let u1 = &maps[0].0;
    // Columns: means above and below, the maxima above and beneath, the ridge.
    let columns = crate::kernels::columns::Columns::new(u1, &m, h, w, reach(mmy));
    // The mean beneath is a mean of grey levels: the intensity's rank map keeps it invariant
    // to a gain or dynamic-range change (and "nothing beneath", 0, stays lowest).
    let below_rank = |v: f32| rank.map(v);
    let share = &maps[2].2;
    let (ry, rx) = windows[2];
    let span = |i: usize, r: usize, len: usize| (i + r + 1).min(len) - i.saturating_sub(r);
    let copy = |dst: &mut [f32], src: &[f32]| dst.copy_from_slice(src);
    // Every plane on its own (in parallel), row-major pixels; values that are not finite
    // become 0 while the plane is still in cache.
    out.par_chunks_mut(n).enumerate().for_each(|(k, plane)| {
        match k {
            0 => copy(plane, &u),
            1 => copy(plane, u1),
            2 => copy(plane, &maps[2].0),
            3 => copy(plane, &maps[3].0),
            4 => {
                let (a, q) = (&maps[1].0, maps[1].1.as_deref().unwrap_or(&[]));
                for ((o, a), q) in plane.iter_mut().zip(a).zip(q) {
                    *o = (q - a * a).max(0.0).sqrt();
                }
            }
            5 => copy(plane, &maps[4].0),
            6 => copy(plane, &maps[5].0),
            20 => copy(plane, &maps[6].0),
            21 => copy(plane, &maps[7].0),
            7..=11 | 17 | 18 => {
                let j = match k {
                    7 => 0,
                    8 => 1,
                    9 => 4,
                    10 => 5,
                    11 => 2,
                    17 => 3,
                    _ => 6,
                };
                columns.plane(j, plane);
            }
            12 => {
                for (y, row) in plane.chunks_exact_mut(w).enumerate() {
                    row.fill((y as f64 * mmy / DEPTH_SCALE_MM) as f32);
                }
            }
            13 => copy_map(plane, &f.phase_symmetry, |v| v),
            14 => copy_map(plane, &f.coherence, |v| v),
            15 => {
                for ((o, c), t) in plane.iter_mut().zip(&f.coherence).zip(&f.orientation) {
                    *o = c * abs_cos(*t);
                }
            }
            16 => copy_map(plane, &f.below, below_rank),
            19 => {
                for (y, row) in plane.chunks_exact_mut(w).enumerate() {
                    let sy = span(y, ry, h);
                    for (x, o) in row.iter_mut().enumerate() {
                        *o = share[y * w + x] / (sy * span(x, rx, w)) as f32;
                    }
                }
            }
            _ => {}
        }
        for v in plane.iter_mut() {
            if !v.is_finite() {
                *v = 0.0;
            }
        }
    });
    out
}

/// `plane[i] = f(map[i])` in the map's logical (row-major) order.
fn copy_map(plane: &mut [f32], map: &Array2<f32>, f: impl Fn(f32) -> f32) {
    match map.as_slice() {
        Some(v) => {
            for (o, v) in plane.iter_mut().zip(v) {
                *o = f(*v);
            }
        }
        None => {
            for (o, v) in plane.iter_mut().zip(map.iter()) {
                *o = f(*v);
            }
        }
    }
}

/// The model shipped with this build (`models/pixel_mlp.json`), checked against this build's
/// features and labels (`tests/pixels.rs` checks it loads: a build whose model does not fit
/// its features does not pass).
pub fn builtin_model() -> crate::Result<&'static PixelModel> {
    static MODEL: ModelCell = std::sync::OnceLock::new();
    load_builtin(
        &MODEL,
        include_str!("../../models/pixel_mlp.json"),
        &FEATURE_NAMES,
        "models/pixel_mlp.json",
    )
}

/// Where a shipped model is parsed once and kept (or why it could not be).
pub(crate) type ModelCell = std::sync::OnceLock<Result<PixelModel, String>>;

/// A model shipped with the build (`text`, from `file`), parsed on first use into `cell` and
/// checked against the `inputs` this build computes and the labels.
pub(crate) fn load_builtin(
    cell: &'static ModelCell,
    text: &str,
    inputs: &[&str],
    file: &'static str,
) -> crate::Result<&'static PixelModel> {
    cell.get_or_init(|| {
        PixelModel::from_json(text, inputs, &class_names()).map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|reason| {
        crate::kernels::KernelError::InvalidParameter {
            name: file,
            reason: reason.clone(),
        }
        .into()
    })
}

/// The label names in code order: the model's classes.
pub fn class_names() -> Vec<&'static str> {
    Label::ALL.iter().map(|l| l.name()).collect()
}

/// Radius over which class probabilities are averaged before the decision, mm (about the
/// lateral resolution of a 10 MHz linear probe, 0.3 mm).
const SMOOTH_MM: f64 = 0.3;
/// Joint fluid, vessels and nerves thinner than this are not kept, mm (smaller than any
/// effusion, vessel or nerve an injection must see; see `MIN_AREA_MM2`).
const OPEN_MM: f64 = 0.8;

/// How far joint fluid may lie from the bone surface, mm: effusions and recesses rest on the
/// cartilage over bone (hyaline cartilage at most about 3 mm thick at the knee, thinner
/// elsewhere) or on the fat pads beside it (Bianchi & Martinoli, "Ultrasound of the
/// Musculoskeletal System", Springer 2007).
pub const JOINT_REACH_MM: f64 = 4.0;

/// Whether grid pixel `(y, x)` lies within `reach` mm of the bone surface (in any column).
fn near_bone(surface: &[Option<f32>], y: usize, x: usize, mm: (f64, f64), reach: f64) -> bool {
    let cols = (reach / mm.0).ceil() as usize;
    let (x0, x1) = (x.saturating_sub(cols), (x + cols + 1).min(surface.len()));
    (x0..x1).any(|c| {
        surface[c].is_some_and(|s| {
            let dx = (c as f64 - x as f64) * mm.0;
            let dy = (s as f64 - y as f64) * mm.1;
            dx.hypot(dy) <= reach
        })
    })
}

/// One class's probabilities as a grid.
pub fn class_map(probs: &[f32], dim: (usize, usize), label: Label) -> Array2<f32> {
    let n = dim.0 * dim.1;
    let k = label.code() as usize;
    Array2::from_shape_fn(dim, |(y, x)| {
        probs.get(k * n + y * dim.1 + x).copied().unwrap_or(0.0)
    })
}

/// Joint fluid shallower than this everywhere is not kept, mm: ultrasound reports a knee
/// effusion from 2 mm of depth ("Detectable threshold of knee effusion by ultrasonography in
/// osteoarthritis patients", Am J Phys Med Rehabil 2011;90(2):112–8), and a collection
/// thinner than that leaves no room for a needle tip either.
pub const MIN_FLUID_DEPTH_MM: f64 = 2.0;

/// The component's greatest depth: its most pixels in one column, mm.
fn deepest_column_mm(c: &super::components::Component, mm_per_row: f64) -> f64 {
    let (x0, x1) = (c.bbox.1, c.bbox.3);
    let mut count = vec![0usize; x1 - x0 + 1];
    for &(_, x) in &c.pixels {
        count[x - x0] += 1;
    }
    count.into_iter().max().unwrap_or(0) as f64 * mm_per_row
}

/// Smallest areas kept of the soft-tissue labels, mm², from the smallest of each structure
/// that an MSK injection must see (sizes from Bianchi & Martinoli, "Ultrasound of the
/// Musculoskeletal System", Springer 2007): tendons about 1 mm thick (finger extensors) seen
/// over 3 mm or more; effusions and recesses from about 1 mm deep over 1 mm; vessels from
/// about 1.5 mm across (the arteries near injection sites: radial 2–3 mm, genicular and
/// circumflex branches 1.5–2 mm); nerves from about 1.5 mm across (digital nerves).
const MIN_AREA_MM2: [(Label, f64); 4] = [
    (Label::Tendon, 3.0),
    (Label::Joint, 1.0),
    (Label::Vessel, 1.75),
    (Label::Nerve, 1.5),
];

/// Mean vessel probability (averaged over [`SMOOTH_MM`]) a vessel component needs over its
/// pixels. Dark, compact patches of muscle or fat come out vessel-most-likely but with less
/// confidence than a lumen inside its wall. Chosen on the validation split (pulse-echo
/// every-5th training case, own phantom seeds 700–729): at 0.6–0.8 vessel Dice rose with the
/// threshold (0.37 → 0.52 and 0.66 → 0.75), at 0.85 true vessels began to be lost (0.37,
/// 0.64); 0.75 keeps a margin from that edge.
pub const MIN_VESSEL_PROBABILITY: f32 = 0.75;

/// Nerve probability (averaged over [`SMOOTH_MM`]) from which a pixel not labelled nerve is a
/// *possible* nerve, kept clear of like a nerve by the planner. The classifier misses nerves
/// more often than any other structure (its held-out nerve recall is the lowest, see
/// `models/README.md`), and a missed nerve is the one mistake an injection must not make:
/// in doubt, the planner keeps away. Chosen on the tuning sets (pulse-echo `nerve-tune` and
/// the validation split), trying the threshold on the labels first: at 0.2 no path there came
/// within the nerve margin of a truth nerve, at 0.3 one did (as labels, 0.2 also invented
/// nerves: nerve Dice 0.59 → 0.28 on the validation split, hence an obstacle, not a label).
pub const POSSIBLE_NERVE_PROBABILITY: f32 = 0.2;

/// The soft-tissue decisions of the grid.
pub struct SoftTissue {
    /// Tendon, joint / effusion, vessel and nerve where each is the most probable class,
    /// without components smaller than the structure can be.
    pub labels: Array2<u8>,
    /// Possible nerve: pixels not labelled nerve whose nerve probability reaches
    /// [`POSSIBLE_NERVE_PROBABILITY`], in patches at least as large as the smallest nerve.
    pub possible_nerve: Array2<bool>,
}

/// The soft-tissue labels of the grid (tendon, joint / effusion, vessel, nerve) where each is
/// the most probable class, without components smaller than the structure can be, and the
/// possible nerves beside them.
///
/// Joint space and effusion lie on bone: a component none of whose pixels comes within
/// [`JOINT_REACH_MM`] of the bone `surface` (grid rows per column) is not kept.
///
/// Possible nerve is read from the larger of `probs`' nerve probability and `first_stage`'s
/// (the classifier's first stage, when there is one): [`POSSIBLE_NERVE_PROBABILITY`] was
/// chosen on the first stage's probabilities, and the second stage, surer of itself, would
/// otherwise let the safety margin shrink where the first stage had its doubts.
pub fn soft_tissue(
    probs: &[f32],
    first_stage: Option<&[f32]>,
    f: &Features,
    surface: &[Option<f32>],
) -> SoftTissue {
    let dim = f.intensity.dim();
    let n = dim.0 * dim.1;
    // Probabilities averaged over about a resolution cell, so that single speckle-sized
    // pixels do not flip the decision.
    let (ry, rx) = (
        px(SMOOTH_MM, f.mm_per_px.1, 0),
        px(SMOOTH_MM, f.mm_per_px.0, 0),
    );
    let nerve = Label::Nerve.code() as usize;
    let count = (ry + rx > 0).then(|| valid_counts(&vec![1f32; n], dim.0, dim.1, ry, rx));
    let smooth = |p: &[f32]| -> Vec<f32> {
        match &count {
            Some(count) => box_means(p, count, dim.0, dim.1, ry, rx),
            None => p.to_vec(),
        }
    };
    let mut smoothed = vec![0f32; CLASSES * n];
    smoothed
        .par_chunks_mut(n.max(1))
        .enumerate()
        .for_each(|(k, out)| out.copy_from_slice(&smooth(&probs[k * n..(k + 1) * n])));
    let mut nerve_doubt = smoothed[nerve * n..(nerve + 1) * n].to_vec();
    if let Some(first) = first_stage.filter(|p| p.len() == probs.len()) {
        for (d, p) in nerve_doubt
            .iter_mut()
            .zip(smooth(&first[nerve * n..(nerve + 1) * n]))
        {
            *d = d.max(p);
        }
    }
    let probs = &smoothed[..];
    // The most probable class per pixel, a class plane at a time (the planes are read in
    // order rather than seven strides apart per pixel); ties keep the lower class, as a
    // per-pixel scan from class 0 would.
    let mut arg = vec![0u8; n];
    let mut top = probs[..n].to_vec();
    for k in 1..CLASSES {
        for ((a, t), &p) in arg.iter_mut().zip(&mut top).zip(&probs[k * n..(k + 1) * n]) {
            if p > *t {
                *t = p;
                *a = k as u8;
            }
        }
    }
    for (a, v) in arg.iter_mut().zip(f.valid.iter()) {
        if !*v {
            *a = Label::Background.code();
        }
    }
    let best = Array2::from_shape_vec(dim, arg).unwrap_or_else(|_| Array2::zeros(dim));
    let mut out = Array2::<u8>::zeros(dim);
    let px_mm2 = f.mm_per_px.0 * f.mm_per_px.1;
    // Each label's components on their own (in parallel: the labels' masks are disjoint).
    let kept: Vec<(Label, Vec<(usize, usize)>)> = MIN_AREA_MM2
        .par_iter()
        .map(|&(label, min_mm2)| {
            let mut mask = best.mapv(|l| l == label.code());
            if label != Label::Tendon {
                // Fluid and nerves are compact: strands thinner than OPEN_MM are clutter.
                let r = px(OPEN_MM / 2.0, f.mm_per_px.0.max(f.mm_per_px.1), 0);
                if r > 0 {
                    mask = super::components::open_close(&mask, r);
                }
            }
            let mut pixels = Vec::new();
            for c in super::components::components(&mask) {
                let on_bone = label != Label::Joint
                    || c.pixels
                        .iter()
                        .any(|&(y, x)| near_bone(surface, y, x, f.mm_per_px, JOINT_REACH_MM));
                let deep_enough = label != Label::Joint
                    || deepest_column_mm(&c, f.mm_per_px.1) >= MIN_FLUID_DEPTH_MM;
                let confident = label != Label::Vessel || {
                    let k = label.code() as usize;
                    let sum: f32 = c
                        .pixels
                        .iter()
                        .map(|&(y, x)| probs[k * n + y * dim.1 + x])
                        .sum();
                    sum >= MIN_VESSEL_PROBABILITY * c.pixels.len() as f32
                };
                if on_bone && deep_enough && confident && c.area() as f64 * px_mm2 >= min_mm2 {
                    pixels.extend_from_slice(&c.pixels);
                }
            }
            (label, pixels)
        })
        .collect();
    for (label, pixels) in kept {
        for (y, x) in pixels {
            out[[y, x]] = label.code();
        }
    }
    merge_fluid_into_joint(&mut out);
    let doubt = Array2::from_shape_fn(dim, |(y, x)| {
        f.valid[[y, x]]
            && out[[y, x]] != Label::Nerve.code()
            && nerve_doubt[y * dim.1 + x] >= POSSIBLE_NERVE_PROBABILITY
    });
    let min_nerve_mm2 = MIN_AREA_MM2
        .iter()
        .find(|(l, _)| *l == Label::Nerve)
        .map_or(0.0, |(_, a)| *a);
    let mut possible_nerve = Array2::from_elem(dim, false);
    for c in super::components::components(&doubt) {
        if c.area() as f64 * px_mm2 >= min_nerve_mm2 {
            for &(y, x) in &c.pixels {
                possible_nerve[[y, x]] = true;
            }
        }
    }
    SoftTissue {
        labels: out,
        possible_nerve,
    }
}

/// A vessel component that touches joint fluid is part of the same fluid collection (a
/// vessel's lumen lies inside its own wall, not against an effusion): it becomes joint.
fn merge_fluid_into_joint(labels: &mut Array2<u8>) {
    let (h, w) = labels.dim();
    let vessel = labels.mapv(|l| l == Label::Vessel.code());
    for c in super::components::components(&vessel) {
        let touches = c.pixels.iter().any(|&(y, x)| {
            let (y0, y1) = (y.saturating_sub(1), (y + 1).min(h - 1));
            let (x0, x1) = (x.saturating_sub(1), (x + 1).min(w - 1));
            (y0..=y1).any(|yy| (x0..=x1).any(|xx| labels[[yy, xx]] == Label::Joint.code()))
        });
        if touches {
            for &(y, x) in &c.pixels {
                labels[[y, x]] = Label::Joint.code();
            }
        }
    }
}
