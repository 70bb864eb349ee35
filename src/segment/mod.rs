//! Segmentation of musculoskeletal structures in one frame: bone surface, acoustic shadow,
//! tendon, joint space / effusion, vessel.
//!
//! Works inside the imaging region, leaving the colour pixels out of the B-mode decisions;
//! colour flow inside the region is then labelled vessel ([`doppler`]).
//! Features come from the kernels (phase symmetry, shadow, coherence), computed on the GPU or
//! the CPU; the decisions (dynamic programming for the bone surface, connected components for
//! fluid and tendon) run on the CPU, where they are cheap. Label values are those of
//! [`crate::label::Label`].

pub mod bone;
pub mod components;
pub mod context;
pub mod doppler;
pub mod fluid;
pub mod pixels;
pub mod tendon;

use ndarray::{s, Array2};
use serde::Serialize;

use crate::frame::Frame;
use crate::gpu::{Compute, Ran};
use crate::label::Label;
use crate::Result;

/// Pixel size assumed for frames without a usable calibration (a typical MSK linear probe
/// display); results in mm are then marked as assumed.
pub const ASSUMED_MM_PER_PX: f64 = 0.1;

/// Settings of the segmenter (all lengths in mm, converted with the frame's calibration).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SegmentParams {
    /// Smallest log-Gabor wavelength, mm.
    pub ps_min_wavelength_mm: f64,
    /// Log-Gabor scales.
    pub ps_scales: u32,
    /// Log-Gabor orientations.
    pub ps_orientations: u32,
    /// Bone score above which a column holds bone (dynamic programming's break-even).
    pub bone_threshold: f32,
    /// Largest step of the bone surface between neighbouring columns, mm.
    pub bone_max_step_mm: f64,
    /// Shortest bone segment kept, mm.
    pub bone_min_length_mm: f64,
    /// Despeckled tissue darker than this share of the frame's tissue level is anechoic
    /// (fluid). A share, not a grey level, so that gain and dynamic range do not move it.
    pub fluid_ratio: f32,
    /// Frames wider than this (px) are analysed at half resolution for the features.
    pub half_resolution_above_px: usize,
    /// Decide with the pixel classifier ([`pixels`]; the bone surface then follows its bone
    /// probability) rather than the hand-made rules of `bone`, `fluid` and `tendon`.
    pub learned: bool,
}

impl Default for SegmentParams {
    fn default() -> Self {
        SegmentParams {
            ps_min_wavelength_mm: 0.6,
            ps_scales: 3,
            ps_orientations: 3,
            bone_threshold: 0.12,
            bone_max_step_mm: 0.25,
            bone_min_length_mm: 3.0,
            fluid_ratio: 0.45,
            half_resolution_above_px: 400,
            learned: true,
        }
    }
}

/// What the segmenter found in one frame.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Segmentation {
    /// Labels, full-frame size (0 background, 1 tendon, 2 bone, 3 shadow, 4 joint, 5 vessel).
    pub labels: Array2<u8>,
    /// Bone surface polylines, full-frame (column, row).
    pub bone_polylines_px: Vec<Vec<[f64; 2]>>,
    /// The same in mm (lateral from the reference pixel, depth from the transducer face).
    pub bone_polylines_mm: Vec<Vec<[f64; 2]>>,
    /// Millimetres per pixel used (x, y).
    pub mm_per_px: (f64, f64),
    /// Whether `mm_per_px` was assumed (the frame has no usable calibration).
    pub calibration_assumed: bool,
    /// Possible nerve, full-frame: background or tendon pixels the pixel classifier gives at
    /// least [`pixels::POSSIBLE_NERVE_PROBABILITY`] of being nerve. Not a label (the label
    /// map says what is most probable); the planner keeps the nerve margin from it too.
    /// `None` when there is none (or the rules segmented the frame).
    pub possible_nerve: Option<Array2<bool>>,
}

/// The bone polylines in the JSON form of `frame_NNNN.bone.json`.
#[derive(Debug, Clone, Serialize)]
pub struct BoneJson {
    /// Polylines in full-frame px (column, row).
    pub polylines_px: Vec<Vec<[f64; 2]>>,
    /// Polylines in mm (lateral, depth from the transducer face).
    pub polylines_mm: Vec<Vec<[f64; 2]>>,
    /// Millimetres per pixel used.
    pub mm_per_px: [f64; 2],
    /// True when the frame had no usable calibration and `mm_per_px` was assumed.
    pub calibration_assumed: bool,
}

impl Segmentation {
    /// The label map the planner keeps clear of: the labels, with possible nerve
    /// ([`Segmentation::possible_nerve`]) counted as nerve.
    pub fn obstacle_labels(&self) -> std::borrow::Cow<'_, Array2<u8>> {
        match &self.possible_nerve {
            Some(m) if m.dim() == self.labels.dim() => {
                let mut l = self.labels.clone();
                l.zip_mut_with(m, |l, &doubt| {
                    if doubt {
                        *l = Label::Nerve.code();
                    }
                });
                std::borrow::Cow::Owned(l)
            }
            _ => std::borrow::Cow::Borrowed(&self.labels),
        }
    }

    /// The bone JSON document.
    pub fn bone_json(&self) -> BoneJson {
        BoneJson {
            polylines_px: self.bone_polylines_px.clone(),
            polylines_mm: self.bone_polylines_mm.clone(),
            mm_per_px: [self.mm_per_px.0, self.mm_per_px.1],
            calibration_assumed: self.calibration_assumed,
        }
    }
}

/// Feature maps on the analysis grid (the region, possibly at half resolution).
#[derive(Debug, Clone)]
pub struct Features {
    /// Despeckled intensity.
    pub intensity: Array2<f32>,
    /// Phase symmetry, 0..1.
    pub phase_symmetry: Array2<f32>,
    /// Mean intensity beneath each pixel.
    pub below: Array2<f32>,
    /// Structure coherence, 0..1.
    pub coherence: Array2<f32>,
    /// Structure orientation, radians, 0 horizontal.
    pub orientation: Array2<f32>,
    /// Where the analysis grid may be analysed (inside the region, not colour, not graphics).
    pub valid: Array2<bool>,
    /// The same at full resolution, region-sized.
    pub valid_full: Array2<bool>,
    /// Analysis grid step in full-frame pixels (1 or 2).
    pub step: usize,
    /// Millimetres per analysis pixel (x, y).
    pub mm_per_px: (f64, f64),
    /// The frame's tissue level on the analysis grid (median above a relative noise floor):
    /// the reference of every brightness ratio in the decisions.
    pub tissue_level: f32,
    /// The pixel classifier's class probabilities on the grid (`pixels::CLASSES` × pixels,
    /// class-major), when the segmenter is set to use it.
    pub probabilities: Option<Vec<f32>>,
    /// The classifier's first stage's probabilities (same layout), before the second stage
    /// looked at their context ([`context`]): the possible nerve reads its nerve channel too.
    pub first_stage: Option<Vec<f32>>,
}

/// The three feature kernels' parameters, for [`feature_params`]' result.
type FeatureParams = (
    crate::kernels::phase_symmetry::Params,
    crate::kernels::shadow::Params,
    crate::kernels::coherence::Params,
);

/// The feature maps of a frame: the valid mask and analysis grid, then `kernels` on the grid
/// giving phase symmetry, the mean below, coherence and orientation.
fn features_with(
    frame: &Frame,
    despeckled: &Array2<f32>,
    params: &SegmentParams,
    kernels: impl FnOnce(&Array2<f32>, &FeatureParams) -> Result<[Array2<f32>; 4]>,
) -> Result<Features> {
    frame.validate()?;
    check_same_size(frame, despeckled)?;
    let valid_full = valid_mask(frame);
    let (grid, valid, step, mm) = analysis_grid(frame, despeckled, &valid_full, params);
    let fp = feature_params(params, mm, grid.nrows())?;
    let [phase_symmetry, below, coherence, orientation] = kernels(&grid, &fp)?;
    let tissue_level = bone::tissue_level(&grid, &valid);
    Ok(Features {
        probabilities: None,
        first_stage: None,
        tissue_level,
        intensity: grid,
        phase_symmetry,
        below,
        coherence,
        orientation,
        valid,
        valid_full,
        step,
        mm_per_px: mm,
    })
}

/// The despeckled image must be the frame's size (it is sliced by the frame's region).
fn check_same_size(frame: &Frame, despeckled: &Array2<f32>) -> Result<()> {
    if despeckled.dim() != frame.intensity.dim() {
        return Err(crate::frame::FrameError::Invalid {
            name: "despeckled",
            reason: format!(
                "{:?} for a {}x{} frame",
                despeckled.dim(),
                frame.width(),
                frame.height()
            ),
        }
        .into());
    }
    Ok(())
}

/// Computes the feature maps on the CPU.
pub fn features_cpu(
    frame: &Frame,
    despeckled: &Array2<f32>,
    params: &SegmentParams,
) -> Result<Features> {
    let mut f = features_with(frame, despeckled, params, |grid, fp| {
        let plan = cached_plan(&fp.0, grid.ncols(), grid.nrows());
        let phase_symmetry = plan.run(grid)?;
        let below = crate::kernels::shadow::cpu(grid, &fp.1)?;
        let (coherence, orientation) = crate::kernels::coherence::cpu_fast(grid, &fp.2)?;
        Ok([phase_symmetry, below, coherence, orientation])
    })?;
    if params.learned {
        let (second, first) =
            context::classify(&f, |m, x| Ok(pixels::pixel_mlp::cpu(m, x, &f.valid)))?;
        f.probabilities = Some(second);
        f.first_stage = Some(first);
    }
    Ok(f)
}

/// Phase symmetry plans, kept per size and parameters: building one evaluates every filter.
type PlanCache = std::sync::Mutex<Vec<std::sync::Arc<crate::kernels::phase_symmetry::Plan>>>;
static PLANS: PlanCache = std::sync::Mutex::new(Vec::new());
/// Plans kept (frame sizes seen recently).
const PLANS_KEPT: usize = 4;

fn cached_plan(
    p: &crate::kernels::phase_symmetry::Params,
    width: usize,
    height: usize,
) -> std::sync::Arc<crate::kernels::phase_symmetry::Plan> {
    let mut plans = PLANS.lock().unwrap_or_else(|e| e.into_inner());
    let want = p.resolved(width, height);
    if let Some(found) = plans
        .iter()
        .find(|pl| pl.fits(width, height) && pl.params_equal(&want))
    {
        return found.clone();
    }
    let plan = std::sync::Arc::new(crate::kernels::phase_symmetry::Plan::new(p, width, height));
    plans.push(plan.clone());
    if plans.len() > PLANS_KEPT {
        plans.remove(0);
    }
    plan
}

/// Computes the feature maps on the GPU: the analysis grid is uploaded and each feature kernel
/// runs there (phase symmetry's FFTs included); for the learned segmenter the pixel features
/// and both classifier stages follow in the same submission. The maps (and probabilities)
/// come back in one read-back for the decisions.
#[cfg(feature = "gpu")]
pub fn features_gpu(
    ctx: &crate::gpu::GpuContext,
    frame: &Frame,
    despeckled: &Array2<f32>,
    params: &SegmentParams,
) -> Result<Features> {
    let mut probabilities = None;
    let mut f = features_with(frame, despeckled, params, |grid, fp| {
        // One upload, the three kernel chains each starting from it, then (for the
        // classifier) the pixel features and both stages in the same submission; one
        // read-back of the four maps and the probabilities.
        let (h, w) = grid.dim();
        let classifier = match params.learned {
            true => Some((
                ctx.reserve(w, context::GPU_CHAIN_PLANES * h)?,
                context::GpuModels::for_grid(w, h)?,
            )),
            false => None,
        };
        let mut chain = ctx.begin(grid)?;
        encode_feature_maps(&mut chain, fp)?;
        match classifier {
            Some((reserved, models)) => {
                let valid = grid_mask(&valid_mask(frame), grid_geometry(frame, params).1);
                let mm = grid_geometry(frame, params).2;
                let (maps, _, probs) = classify_in_chain(chain, reserved, &models, &valid, mm)?;
                probabilities = Some(probs);
                four_maps(maps)
            }
            None => four_maps(chain.finish_outputs(4)?),
        }
    })?;
    if let Some((second, first)) = probabilities {
        f.probabilities = Some(second);
        f.first_stage = Some(first);
    }
    Ok(f)
}

/// Queues the three feature kernels on the chain's current image (the analysis grid), each
/// starting from it, their four maps set aside for one read-back.
#[cfg(feature = "gpu")]
fn encode_feature_maps(chain: &mut crate::gpu::GpuChain<'_>, fp: &FeatureParams) -> Result<()> {
    chain.keep_input()?;
    crate::kernels::phase_symmetry::encode(chain, &fp.0)?;
    chain.set_aside(0, false)?;
    chain.restart()?;
    crate::kernels::shadow::encode(chain, &fp.1)?;
    chain.set_aside(1, false)?;
    chain.restart()?;
    crate::kernels::coherence::encode(chain, &fp.2)?;
    chain.set_aside(2, true)?;
    Ok(())
}

#[cfg(feature = "gpu")]
fn four_maps(maps: Vec<Array2<f32>>) -> Result<[Array2<f32>; 4]> {
    Ok(maps.try_into().map_err(|_| crate::gpu::GpuError::Kernel {
        kernel: "features".into(),
        reason: "four maps expected".into(),
    })?)
}

/// Whether [`despeckle_and_features_gpu`] can take the frame: its imaging region lies inside
/// it and is not empty.
pub fn one_submission_fits(frame: &Frame) -> bool {
    let b = frame.region.bounds;
    let (h, w) = frame.intensity.dim();
    b.width() > 0 && b.height() > 0 && b.x1 <= w && b.y1 <= h
}

/// Despeckles the frame's imaging region and computes the feature maps in one GPU
/// submission: the region is uploaded once, despeckled, set aside, cut to the analysis grid
/// on the GPU (`shaders/grid.wgsl`) and handed to the feature kernels; the despeckled region
/// and the four maps come back after one wait. The same result as
/// `pipeline::despeckle_region` followed by [`features_gpu`], with one read-back fewer.
/// Returns the despeckled frame (the margins as they were) and the features.
#[cfg(feature = "gpu")]
pub fn despeckle_and_features_gpu(
    ctx: &crate::gpu::GpuContext,
    frame: &Frame,
    filters: &[crate::despeckle::Filter],
    params: &SegmentParams,
) -> Result<(Array2<f32>, Features)> {
    frame.validate()?;
    if !one_submission_fits(frame) {
        return Err(crate::frame::FrameError::Invalid {
            name: "region",
            reason: format!(
                "{:?} is empty or outside the {}x{} frame",
                frame.region.bounds,
                frame.width(),
                frame.height()
            ),
        }
        .into());
    }
    let b = frame.region.bounds;
    let region = s![b.y0..b.y1, b.x0..b.x1];
    let crop = frame.intensity.slice(region).to_owned();
    let (grid_h, step, mm) = grid_geometry(frame, params);
    let fp = feature_params(params, mm, grid_h)?;
    let grid_w = if step == 2 {
        crate::kernels::grid::grid_size(b.width(), b.height()).0
    } else {
        b.width()
    };
    // The classifier's set is the largest of the frame's: reserved before the others.
    let classifier = match params.learned {
        true => Some((
            ctx.reserve(grid_w, context::GPU_CHAIN_PLANES * grid_h)?,
            context::GpuModels::for_grid(grid_w, grid_h)?,
        )),
        false => None,
    };
    let mut chain = ctx.begin(&crop)?;
    for f in filters {
        f.encode(&mut chain)?;
    }
    chain.stage()?;
    let mut chain = if step == 2 {
        let (gw, gh) = crate::kernels::grid::encode(&mut chain)?;
        chain.hand_over(gw, gh)?
    } else {
        chain
    };
    encode_feature_maps(&mut chain, &fp)?;
    let (maps, inside, probabilities) = match classifier {
        Some((reserved, models)) => {
            let valid = grid_mask(&valid_mask(frame), step);
            let (maps, inside, probs) = classify_in_chain(chain, reserved, &models, &valid, mm)?;
            let inside = inside.ok_or_else(|| crate::gpu::GpuError::Kernel {
                kernel: "read-back".into(),
                reason: "the despeckled region was not staged".into(),
            })?;
            (maps, inside, Some(probs))
        }
        None => {
            let (maps, inside) = chain.finish_outputs_staged(4)?;
            (maps, inside, None)
        }
    };
    let mut despeckled = frame.intensity.clone();
    despeckled.slice_mut(region).assign(&inside);
    let maps = four_maps(maps)?;
    let mut f = features_with(frame, &despeckled, params, |grid, _| {
        // The CPU's grid of the despeckled region read back is the grid the GPU cut.
        match maps.iter().all(|m| m.dim() == grid.dim()) {
            true => Ok(maps),
            false => Err(crate::gpu::GpuError::Kernel {
                kernel: "grid".into(),
                reason: format!("maps of {:?} for a grid of {:?}", maps[0].dim(), grid.dim()),
            }
            .into()),
        }
    })?;
    if let Some((second, first)) = probabilities {
        f.probabilities = Some(second);
        f.first_stage = Some(first);
    }
    Ok((despeckled, f))
}

/// The maps read back, the image staged earlier in the chain (the despeckled region), if
/// any, and the classifier's two stages' probabilities (the second's, then the first's).
#[cfg(feature = "gpu")]
type ChainResults = (Vec<Array2<f32>>, Option<Array2<f32>>, (Vec<f32>, Vec<f32>));

/// Goes on from the feature maps (set aside on `chain`, with the grid kept as its input) to
/// the pixel features and both classifier stages in the `reserved` set, in the same
/// submission, and reads back the maps, the image staged earlier (if any) and both stages'
/// probabilities at once. `valid` is the grid's valid mask.
#[cfg(feature = "gpu")]
fn classify_in_chain(
    chain: crate::gpu::GpuChain<'_>,
    reserved: crate::gpu::Reserved,
    models: &context::GpuModels,
    valid: &Array2<bool>,
    mm: (f64, f64),
) -> Result<ChainResults> {
    use pixels::{GPU_MAPS, GPU_ONES, GPU_VALID};
    let (h, w) = (chain.height(), chain.width());
    let n = h * w;
    if valid.dim() != (h, w) {
        return Err(crate::gpu::GpuError::Kernel {
            kernel: "grid".into(),
            reason: format!("a {w}x{h} grid for a valid mask of {:?}", valid.dim()),
        }
        .into());
    }
    let [intensity, maps @ ..] = GPU_MAPS;
    let mut copies = vec![(None, intensity * n)];
    copies.extend(maps.iter().enumerate().map(|(k, p)| (Some(k), p * n)));
    let mut chain = chain.continue_in(reserved, &copies)?;
    let mut masks: Vec<f32> = valid.iter().map(|v| f32::from(u8::from(*v))).collect();
    masks.resize(2 * n, 1.0);
    debug_assert_eq!(GPU_ONES, GPU_VALID + 1);
    chain.write_image(GPU_VALID * n, &masks)?;
    chain.write_aux(&models.values)?;
    pixels::encode_features(&mut chain, h, mm, models.scratch)?;
    context::encode_stages(&mut chain, h, mm, models)?;
    // The maps beside the probabilities, in planes the context has finished with.
    let first = context::GPU_PROBS_PLANE - maps.len();
    chain.copy_to_current(maps[0] * n, first * n, maps.len() * n)?;
    let (mut all, inside) =
        chain.finish_range_and_staged(first * n, (maps.len() + 2 * pixels::CLASSES) * n)?;
    let mut second = all.split_off((maps.len() + pixels::CLASSES) * n);
    let mut first_probs = all.split_off(maps.len() * n);
    let maps = all
        .chunks_exact(n)
        .map(|c| Array2::from_shape_vec((h, w), c.to_vec()))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| crate::gpu::GpuError::Kernel {
            kernel: "read-back".into(),
            reason: e.to_string(),
        })?;
    use crate::kernels::pixel_mlp::mask_invalid;
    mask_invalid(&mut first_probs, pixels::CLASSES, valid);
    mask_invalid(&mut second, pixels::CLASSES, valid);
    Ok((maps, inside, (second, first_probs)))
}

/// Kernel parameters for a grid of `mm` per pixel.
pub fn feature_params(
    params: &SegmentParams,
    mm: (f64, f64),
    rows: usize,
) -> Result<FeatureParams> {
    let px = |v_mm: f64| v_mm / mm.1;
    let wavelength = px(params.ps_min_wavelength_mm).max(3.0) as f32;
    let ps = crate::kernels::phase_symmetry::Params::new(
        params.ps_scales,
        params.ps_orientations,
        wavelength,
    )?;
    // Shadow: skip 1 mm (the echo and its tail), average the next 4 mm.
    let gap = px(1.0).round().max(2.0) as u32;
    let length = (px(4.0).round() as u32).clamp(2, rows.max(2) as u32);
    let shadow = crate::kernels::shadow::Params::new(gap, length)?;
    // Structure tensor over about 1.2 mm: several fibrils, so that speckle averages out.
    let radius = (px(0.6).round() as u32).clamp(1, 8);
    let coherence = crate::kernels::coherence::Params::new(radius)?;
    Ok((ps, shadow, coherence))
}

/// Burned-in graphics: a pixel this bright (raw grey) ...
const GRAPHIC_LEVEL: f32 = 200.0;
/// ... whose neighbourhood's median is below this is a stroke of text or a marker, not tissue.
const GRAPHIC_SURROUND: f32 = 90.0;
/// Radius of that neighbourhood (5 × 5), and of the dilation around detected strokes, px.
const GRAPHIC_RADIUS: usize = 2;

/// Pixels of the region that may be analysed (region-sized): inside the imaging region (fan
/// included), not colour (Doppler, coloured annotations), and not burned-in white text or
/// markers (thin bright strokes on a dark surround, found on the raw intensity).
pub fn valid_mask(frame: &Frame) -> Array2<bool> {
    use rayon::prelude::*;
    let b = frame.region.bounds;
    let raw = &frame.intensity;
    let (h, w) = raw.dim();
    let (bh, bw) = (b.height(), b.width());
    if bh == 0 || bw == 0 {
        return Array2::from_elem((bh, bw), false);
    }
    const SIDE: usize = 2 * GRAPHIC_RADIUS + 1;
    let r = GRAPHIC_RADIUS as isize;
    // Rows in parallel; a neighbourhood is judged only under a bright pixel (rare).
    let mut stroke = vec![false; bh * bw];
    stroke.par_chunks_mut(bw).enumerate().for_each(|(y, row)| {
        let fy = y + b.y0;
        for (x, out) in row.iter_mut().enumerate() {
            let fx = x + b.x0;
            if raw[[fy, fx]] < GRAPHIC_LEVEL {
                continue;
            }
            let mut around = [0f32; SIDE * SIDE];
            let mut k = 0;
            for dy in -r..=r {
                let yy = (fy as isize + dy).clamp(0, h as isize - 1) as usize;
                for dx in -r..=r {
                    let xx = (fx as isize + dx).clamp(0, w as isize - 1) as usize;
                    around[k] = raw[[yy, xx]];
                    k += 1;
                }
            }
            let (_, m, _) = around.select_nth_unstable_by(SIDE * SIDE / 2, |a, b| a.total_cmp(b));
            *out = *m < GRAPHIC_SURROUND;
        }
    });
    let graphics = if stroke.iter().any(|v| *v) {
        let stroke = Array2::from_shape_fn((bh, bw), |(y, x)| stroke[y * bw + x]);
        Some(components::morph(&stroke, GRAPHIC_RADIUS, false))
    } else {
        None
    };
    let mut valid = vec![false; bh * bw];
    valid.par_chunks_mut(bw).enumerate().for_each(|(y, row)| {
        let fy = y + b.y0;
        for (x, out) in row.iter_mut().enumerate() {
            let fx = x + b.x0;
            *out = frame.region.contains(fx, fy)
                && frame.colour_mask.as_ref().is_none_or(|m| m[[fy, fx]] == 0)
                && graphics.as_ref().is_none_or(|g| !g[[y, x]]);
        }
    });
    Array2::from_shape_vec((bh, bw), valid).unwrap_or_else(|_| Array2::from_elem((bh, bw), false))
}

/// The region of `despeckled`, at half resolution when it is wide, with its valid mask.
pub fn analysis_grid(
    frame: &Frame,
    despeckled: &Array2<f32>,
    valid_full: &Array2<bool>,
    params: &SegmentParams,
) -> (Array2<f32>, Array2<bool>, usize, (f64, f64)) {
    let b = frame.region.bounds;
    let crop = despeckled.slice(s![b.y0..b.y1, b.x0..b.x1]);
    let (_, step, mm) = grid_geometry(frame, params);
    if step == 1 {
        return (crop.to_owned(), valid_full.clone(), 1, mm);
    }
    let grid = crate::kernels::grid::cpu(crop);
    (grid, grid_mask(valid_full, 2), 2, mm)
}

/// The analysis grid's valid mask from the region's (`step` 1: the same; 2: a grid pixel is
/// valid where the first and last of its four region pixels are).
fn grid_mask(valid_full: &Array2<bool>, step: usize) -> Array2<bool> {
    if step == 1 {
        return valid_full.clone();
    }
    let (w, h) = crate::kernels::grid::grid_size(valid_full.ncols(), valid_full.nrows());
    Array2::from_shape_fn((h, w), |(y, x)| {
        valid_full[[2 * y, 2 * x]] && valid_full[[2 * y + 1, 2 * x + 1]]
    })
}

/// The analysis grid's rows, its step (1: the region as it is; 2: half resolution, for
/// regions wider than `params.half_resolution_above_px`) and its pixel size in mm.
fn grid_geometry(frame: &Frame, params: &SegmentParams) -> (usize, usize, (f64, f64)) {
    let b = frame.region.bounds;
    let (mmx, mmy) = frame
        .calibration
        .mm_per_px()
        .unwrap_or((ASSUMED_MM_PER_PX, ASSUMED_MM_PER_PX));
    if b.width() <= params.half_resolution_above_px || b.height() < 4 {
        (b.height(), 1, (mmx, mmy))
    } else {
        (b.height() / 2, 2, (mmx * 2.0, mmy * 2.0))
    }
}

/// Computes the feature maps where `compute` runs kernels: on its GPU when it has one (falling
/// back to the CPU, with a warning, if the GPU fails under `Backend::Auto`), else on the CPU.
/// Also says which backend ran.
pub fn features(
    compute: &Compute,
    frame: &Frame,
    despeckled: &Array2<f32>,
    params: &SegmentParams,
) -> Result<(Features, Ran)> {
    compute.run(
        "features",
        |ctx| {
            #[cfg(feature = "gpu")]
            {
                features_gpu(ctx, frame, despeckled, params)
            }
            #[cfg(not(feature = "gpu"))]
            match *ctx {}
        },
        || features_cpu(frame, despeckled, params),
    )
}

/// Segments one frame with the features computed where `compute` runs kernels.
pub fn segment_with(
    compute: &Compute,
    frame: &Frame,
    despeckled: &Array2<f32>,
    params: &SegmentParams,
) -> Result<Segmentation> {
    let (f, _) = features(compute, frame, despeckled, params)?;
    segment_from_features(frame, despeckled, &f, params)
}

/// Segments one frame from its despeckled intensity, features on the CPU.
pub fn segment(
    frame: &Frame,
    despeckled: &Array2<f32>,
    params: &SegmentParams,
) -> Result<Segmentation> {
    let f = features_cpu(frame, despeckled, params)?;
    segment_from_features(frame, despeckled, &f, params)
}

/// Break-even bone probability of the pixel classifier for the surface search: a pixel more
/// likely bone than not adds to a surface through it.
const BONE_PROBABILITY: f32 = 0.5;

/// Carries soft-tissue labels (tendon, joint, vessel, nerve) of the analysis grid to full
/// resolution, where bone and shadow left room.
fn carry_soft_tissue(
    grid: &Array2<u8>,
    step: usize,
    valid_full: &Array2<bool>,
    labels: &mut Array2<u8>,
) {
    use rayon::prelude::*;
    let (gh, gw) = grid.dim();
    if gh == 0 || gw == 0 {
        return;
    }
    let carried = [Label::Tendon, Label::Joint, Label::Vessel, Label::Nerve].map(|s| s.code());
    labels
        .axis_iter_mut(ndarray::Axis(0))
        .into_par_iter()
        .enumerate()
        .for_each(|(y, mut row)| {
            let gy = (y / step).min(gh - 1);
            for (x, l) in row.iter_mut().enumerate() {
                if *l != Label::Background.code() || !valid_full[[y, x]] {
                    continue;
                }
                let g = grid[[gy, (x / step).min(gw - 1)]];
                if carried.contains(&g) {
                    *l = g;
                }
            }
        });
}

/// Carries the grid's possible nerve to full resolution, on background and tendon only (bone,
/// shadow, vessel and nerve are obstacles already; fluid is what a joint target is).
/// `None` when nothing is left.
fn carry_possible_nerve(
    grid: &Array2<bool>,
    step: usize,
    labels: &Array2<u8>,
) -> Option<Array2<bool>> {
    let (gh, gw) = grid.dim();
    if gh == 0 || gw == 0 || !grid.iter().any(|&d| d) {
        return None;
    }
    let soft = [Label::Background.code(), Label::Tendon.code()];
    // Row by row, with each column's grid column looked up once; grid rows without possible
    // nerve leave their full-resolution rows false.
    let (h, w) = labels.dim();
    let grid_col: Vec<usize> = (0..w).map(|x| (x / step.max(1)).min(gw - 1)).collect();
    let mut full = Array2::from_elem((h, w), false);
    let mut any = false;
    for (y, (mut out, row)) in full.rows_mut().into_iter().zip(labels.rows()).enumerate() {
        let g = grid.row((y / step.max(1)).min(gh - 1));
        if !g.iter().any(|&d| d) {
            continue;
        }
        for ((o, l), &gx) in out.iter_mut().zip(row).zip(&grid_col) {
            *o = g[gx] && soft.contains(l);
            any |= *o;
        }
    }
    any.then_some(full)
}

/// Segments one frame given its feature maps.
pub fn segment_from_features(
    frame: &Frame,
    despeckled: &Array2<f32>,
    f: &Features,
    params: &SegmentParams,
) -> Result<Segmentation> {
    // The features were computed from this frame after its full check; the layout is what
    // the slicing below relies on.
    frame.check_layout()?;
    check_same_size(frame, despeckled)?;
    let b = frame.region.bounds;
    let (h, w) = (frame.height(), frame.width());
    let calibration_assumed = frame.calibration.mm_per_px().is_none();
    let mm_full = (f.mm_per_px.0 / f.step as f64, f.mm_per_px.1 / f.step as f64);
    let region_labels = {
        let crop = despeckled.slice(s![b.y0..b.y1, b.x0..b.x1]).to_owned();
        let valid_full = &f.valid_full;
        let fluid_level = params.fluid_ratio * f.tissue_level;
        // Bone is judged by sizes in millimetres (its shadow's depth, its shortest run, the
        // band): without a usable calibration those priors cannot be applied, and a bright
        // line over a dark area (a heart wall over a chamber) would pass for bone. Such a
        // frame gets no bone, so no shadow or joint either; the result says it was
        // uncalibrated.
        let computed;
        let (probs, first_stage) = match (&f.probabilities, params.learned) {
            (Some(p), true) => (Some(&p[..]), f.first_stage.as_deref()),
            (None, true) => {
                computed = context::classify(f, |m, x| Ok(pixels::pixel_mlp::cpu(m, x, &f.valid)))?;
                (Some(&computed.0[..]), Some(&computed.1[..]))
            }
            (_, false) => (None, None),
        };
        let surface = if calibration_assumed {
            vec![None; f.intensity.ncols()]
        } else if let Some(p) = probs {
            let dim = f.intensity.dim();
            let mut bone = pixels::class_map(p, dim, Label::Bone);
            // Bone is only judged where there is image around it: beside the fan's edges or
            // at the bottom of the image its shadow cannot be told from the dark outside.
            let inside = components::morph(&f.valid, bone::edge_margin_px(f), true);
            bone.zip_mut_with(&inside, |b, ok| {
                if !ok {
                    *b = 0.0;
                }
            });
            let mut s = bone::surface_from(&bone, BONE_PROBABILITY, f, params);
            bone::fill_narrow_gaps(&mut s, f.mm_per_px.0, fluid::JOINT_GAP_MM.0);
            bone::drop_runs_without_shadow(
                &mut s,
                &bone,
                &pixels::class_map(p, dim, Label::Shadow),
                f,
            );
            bone::drop_runs_not_darker_than_beside(&mut s, f);
            bone::drop_runs_not_brighter_than_above(&mut s, f);
            bone::bridge_shadowed_gaps(&mut s, f, fluid::JOINT_GAP_MM.1);
            s
        } else {
            bone::surface(f, params)
        };
        let surface_full = bone::refine(&surface, &crop, f.step, mm_full);
        let mut labels = Array2::<u8>::zeros(crop.dim());
        // A fan's beams run from its apex: in the crop's coordinates, and on the grid's.
        let fan_at = |step: usize| {
            frame.region.fan.map(|f| crate::frame::Fan {
                apex: [
                    (f.apex[0] - b.x0 as f64) / step as f64,
                    (f.apex[1] - b.y0 as f64) / step as f64,
                ],
                r_near: f.r_near / step as f64,
                r_far: f.r_far / step as f64,
                ..f
            })
        };
        let shadows = |s: &[Option<f32>], v: &Array2<bool>, mm, step, l: &mut Array2<u8>| {
            match fan_at(step) {
                Some(fan) => bone::label_bone_and_shadow_fan(s, v, mm, &fan, l),
                None => bone::label_bone_and_shadow(s, v, mm, l),
            }
        };
        shadows(&surface_full, valid_full, mm_full, 1, &mut labels);
        let mut possible_nerve = None;
        if let Some(p) = probs {
            let soft = pixels::soft_tissue(p, first_stage, f, &surface);
            carry_soft_tissue(&soft.labels, f.step, valid_full, &mut labels);
            possible_nerve = carry_possible_nerve(&soft.possible_nerve, f.step, &labels);
        } else if f.step == 1 {
            fluid::label_joint_and_effusion(
                &crop,
                valid_full,
                &surface_full,
                mm_full,
                fluid_level,
                &mut labels,
            );
            fluid::label_vessels(&crop, valid_full, mm_full, fluid_level, &mut labels);
            tendon::label_tendon(&crop, f, valid_full, &surface_full, mm_full, 1, &mut labels);
        } else {
            // Soft-tissue decisions on the analysis grid (a quarter of the pixels), then
            // carried to full resolution where the full-resolution bone and shadow left room.
            let mut grid = Array2::<u8>::zeros(f.intensity.dim());
            shadows(&surface, &f.valid, f.mm_per_px, f.step, &mut grid);
            fluid::label_joint_and_effusion(
                &f.intensity,
                &f.valid,
                &surface,
                f.mm_per_px,
                fluid_level,
                &mut grid,
            );
            fluid::label_vessels(&f.intensity, &f.valid, f.mm_per_px, fluid_level, &mut grid);
            tendon::label_tendon(
                &f.intensity,
                f,
                &f.valid,
                &surface,
                f.mm_per_px,
                1,
                &mut grid,
            );
            carry_soft_tissue(&grid, f.step, valid_full, &mut labels);
        }
        // Morphological closing inside the decisions may reach past the valid pixels; nothing
        // is labelled outside the region, on colour or on burned-in graphics.
        for (l, v) in labels.iter_mut().zip(valid_full.iter()) {
            if !*v {
                *l = Label::Background.code();
            }
        }
        (labels, surface_full, possible_nerve)
    };
    let (crop_labels, surface, crop_possible_nerve) = region_labels;
    let possible_nerve = crop_possible_nerve.map(|m| {
        let mut full = Array2::from_elem((h, w), false);
        full.slice_mut(s![b.y0..b.y1, b.x0..b.x1]).assign(&m);
        full
    });
    let mut labels = Array2::<u8>::zeros((h, w));
    labels
        .slice_mut(s![b.y0..b.y1, b.x0..b.x1])
        .assign(&crop_labels);
    // Colour flow is a vessel whatever the B-mode beneath it shows.
    doppler::label_flow(frame, mm_full, &mut labels);
    let top_row = b.y0 as f64;
    let polylines_px: Vec<Vec<[f64; 2]>> = bone::polylines(&surface, mm_full, params)
        .into_iter()
        .map(|l| {
            l.into_iter()
                .map(|[x, y]| [x + b.x0 as f64, y + b.y0 as f64])
                .collect()
        })
        .collect();
    let to_mm = |p: [f64; 2]| -> [f64; 2] {
        match frame.calibration.px_to_mm(p[0], p[1], top_row) {
            Some((x, y)) => [x, y],
            None => [
                (p[0] - b.x0 as f64) * ASSUMED_MM_PER_PX,
                (p[1] - top_row) * ASSUMED_MM_PER_PX,
            ],
        }
    };
    let polylines_mm = polylines_px
        .iter()
        .map(|l| l.iter().map(|p| to_mm(*p)).collect())
        .collect();
    Ok(Segmentation {
        labels,
        bone_polylines_px: polylines_px,
        bone_polylines_mm: polylines_mm,
        mm_per_px: mm_full,
        calibration_assumed,
        possible_nerve,
    })
}
