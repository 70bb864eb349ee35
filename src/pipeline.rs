//! The pipeline: the one place that chains despeckling, features, segmentation and planning
//! and chooses backends. Built once (GPU context, pipelines, buffers), then fed frame after
//! frame; temporal state (plan smoothing over a cine) lives in a [`Session`].

use std::time::Instant;

use ndarray::Array2;
use serde::Serialize;

use crate::despeckle::{Despeckler, Filter};
use crate::frame::Frame;
use crate::gpu::{Backend, Ran};
use crate::plan::{plan, plan_smoothed, NeedlePlan, PlanParams, PlanSmoother};
use crate::segment::{self, SegmentParams, Segmentation};
use crate::Result;

/// Everything the pipeline can be told.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PipelineConfig {
    /// Where kernels run.
    pub backend: Backend,
    /// Despeckling filters, applied in order to the imaging region (its bounding rectangle;
    /// the margins around it are left as they are).
    pub filters: Vec<Filter>,
    /// Segmentation settings.
    pub segment: SegmentParams,
    /// Planning settings.
    pub plan: PlanParams,
    /// Pixel spacing (x, y) in mm for frames whose file gives no usable calibration; without
    /// it such frames are segmented at an assumed spacing and get no plan (`no_calibration`).
    pub spacing_mm: Option<(f64, f64)>,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            backend: Backend::Auto,
            filters: Filter::default_for("srad")
                .map(|f| vec![f])
                .unwrap_or_default(),
            segment: SegmentParams::default(),
            plan: PlanParams::default(),
            spacing_mm: None,
        }
    }
}

impl PipelineConfig {
    /// Checks the settings that have ranges: planning (see [`PlanParams::validate`]) and the
    /// given spacing.
    pub fn validate(&self) -> Result<()> {
        self.plan.validate()?;
        if let Some((x, y)) = self.spacing_mm {
            if let Some(why) = crate::frame::check_spacing_mm(x, y) {
                return Err(crate::plan::PlanError::InvalidParameter {
                    name: "spacing_mm",
                    reason: why,
                }
                .into());
            }
        }
        Ok(())
    }
}

/// Milliseconds spent in each stage of one frame.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StageTimings {
    /// Despeckling (0 on a GPU, where it shares one submission with the feature maps and
    /// is counted in `features_ms`).
    pub despeckle_ms: f64,
    /// Feature maps (on a GPU, despeckling included).
    pub features_ms: f64,
    /// Labelling decisions.
    pub segment_ms: f64,
    /// Planning (and smoothing).
    pub plan_ms: f64,
    /// The whole frame.
    pub total_ms: f64,
}

/// The backend that actually ran each stage that has kernels (segmentation decisions and
/// planning always run on the CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StageBackends {
    /// Despeckling.
    pub despeckle: Ran,
    /// Feature maps.
    pub features: Ran,
}

/// What the pipeline gives for one frame.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct FrameResult {
    /// Despeckled intensity (frame size).
    pub despeckled: Array2<f32>,
    /// Labels and bone polylines.
    pub segmentation: Segmentation,
    /// The suggested path (smoothed over time inside a session).
    pub plan: NeedlePlan,
    /// The path planned on this frame alone.
    pub raw_plan: NeedlePlan,
    /// Time per stage.
    pub timings: StageTimings,
    /// The backend that ran each stage (a GPU failure under `Backend::Auto` shows as `cpu`).
    pub backends: StageBackends,
}

/// Temporal state of one stream of frames (a cine, a live feed).
#[derive(Debug, Clone, Default)]
pub struct Session {
    smoother: PlanSmoother,
    frames: usize,
}

impl Session {
    /// A new stream.
    pub fn new() -> Self {
        Self::default()
    }
    /// Frames seen.
    pub fn frames(&self) -> usize {
        self.frames
    }
}

/// The pipeline, built once.
///
/// ```
/// use sonoguide::sim::phantom::{frame_of, generate, PhantomParams};
/// use sonoguide::{Backend, Pipeline};
///
/// let pipeline = Pipeline::builder().backend(Backend::Cpu).margin_mm(2.0).build()?;
/// let mut params = PhantomParams::default();
/// params.seed = 2;
/// let frame = frame_of(&generate("doc", &params)?, 0)?;
/// let result = pipeline.process(&frame)?;
/// println!("{} in {:.1} ms", result.plan.status, result.timings.total_ms);
/// assert_eq!(result.segmentation.labels.dim(), frame.intensity.dim());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Pipeline {
    despeckler: Despeckler,
    config: PipelineConfig,
}

/// Builds a [`Pipeline`]: `Pipeline::builder().backend(..).filter(..).build()?`.
#[derive(Debug, Default)]
#[must_use]
pub struct PipelineBuilder {
    config: PipelineConfig,
    #[cfg(feature = "gpu")]
    gpu: Option<std::sync::Arc<crate::gpu::GpuContext>>,
}

impl PipelineBuilder {
    /// Where kernels run (default `Backend::Auto`).
    pub fn backend(mut self, backend: Backend) -> Self {
        self.config.backend = backend;
        self
    }
    /// One despeckling filter (default SRAD, 15 iterations).
    pub fn filter(mut self, filter: Filter) -> Self {
        self.config.filters = vec![filter];
        self
    }
    /// Despeckling filters applied in order (none: no despeckling).
    pub fn filters(mut self, filters: Vec<Filter>) -> Self {
        self.config.filters = filters;
        self
    }
    /// Segmentation settings.
    pub fn segment(mut self, params: SegmentParams) -> Self {
        self.config.segment = params;
        self
    }
    /// Planning settings.
    pub fn plan(mut self, params: PlanParams) -> Self {
        self.config.plan = params;
        self
    }
    /// Clearance from bone, shadow and vessels, mm.
    pub fn margin_mm(mut self, mm: f64) -> Self {
        self.config.plan.set_margins_mm(mm);
        self
    }
    /// An injection-site preset's planning settings (see [`crate::plan::preset`]).
    pub fn preset(mut self, preset: &crate::plan::preset::Preset) -> Self {
        preset.apply(&mut self.config.plan);
        self
    }
    /// Pixel spacing (x, y) in mm for frames without a usable calibration of their own.
    pub fn spacing_mm(mut self, x: f64, y: f64) -> Self {
        self.config.spacing_mm = Some((x, y));
        self
    }
    /// A target in mm (lateral, depth) instead of the automatic choice.
    pub fn target_mm(mut self, x: f64, y: f64) -> Self {
        self.config.plan.target_mm = Some((x, y));
        self
    }
    /// Share a GPU device already opened by another pipeline.
    #[cfg(feature = "gpu")]
    pub fn shared_gpu(mut self, gpu: std::sync::Arc<crate::gpu::GpuContext>) -> Self {
        self.gpu = Some(gpu);
        self
    }
    /// Builds the pipeline (opens the GPU if asked and none is shared).
    pub fn build(self) -> Result<Pipeline> {
        #[cfg(feature = "gpu")]
        if let Some(gpu) = self.gpu {
            self.config.validate()?;
            return Ok(Pipeline {
                despeckler: Despeckler::with_gpu(gpu),
                config: self.config,
            });
        }
        Pipeline::new(self.config)
    }
}

impl Pipeline {
    /// A builder with the defaults.
    pub fn builder() -> PipelineBuilder {
        PipelineBuilder::default()
    }

    /// Builds the pipeline (opens the GPU if the backend asks for one).
    pub fn new(config: PipelineConfig) -> Result<Pipeline> {
        config.validate()?;
        Ok(Pipeline {
            despeckler: Despeckler::new(config.backend)?,
            config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &PipelineConfig {
        &self.config
    }

    /// The despeckler (backend, device name).
    pub fn despeckler(&self) -> &Despeckler {
        &self.despeckler
    }

    /// Processes one frame on its own (no temporal smoothing).
    pub fn process(&self, frame: &Frame) -> Result<FrameResult> {
        self.run(frame, None)
    }

    /// Processes the next frame of a stream, smoothing the plan over time.
    pub fn process_in(&self, session: &mut Session, frame: &Frame) -> Result<FrameResult> {
        self.run(frame, Some(session))
    }

    fn run(&self, frame: &Frame, session: Option<&mut Session>) -> Result<FrameResult> {
        // The fields are public: check the invariants the stages rely on before any of them.
        frame.validate()?;
        // A spacing given by the caller stands in only where the file has none.
        let calibrated;
        let frame = match self.config.spacing_mm {
            Some((x, y)) if frame.calibration.mm_per_px().is_none() => {
                calibrated = Frame {
                    calibration: crate::frame::Calibration::Ok {
                        mm_per_px_x: x,
                        mm_per_px_y: y,
                        reference_px: None,
                        source: crate::frame::CalibrationSource::Given,
                    },
                    ..frame.clone()
                };
                &calibrated
            }
            _ => frame,
        };
        let t0 = Instant::now();
        let (despeckled, features, (despeckle_ran, features_ran), t1) = despeckle_and_features(
            &self.despeckler,
            frame,
            &self.config.filters,
            &self.config.segment,
        )?;
        let t2 = Instant::now();
        let segmentation =
            segment::segment_from_features(frame, &despeckled, &features, &self.config.segment)?;
        let t3 = Instant::now();
        let (raw_plan, plan) = match session {
            Some(s) => {
                s.frames += 1;
                plan_smoothed(frame, &segmentation, &self.config.plan, &mut s.smoother)
            }
            None => {
                let p = plan(frame, &segmentation, &self.config.plan);
                (p.clone(), p)
            }
        };
        let t4 = Instant::now();
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        let timings = StageTimings {
            despeckle_ms: ms(t0, t1),
            features_ms: ms(t1, t2),
            segment_ms: ms(t2, t3),
            plan_ms: ms(t3, t4),
            total_ms: ms(t0, t4),
        };
        Ok(FrameResult {
            despeckled,
            segmentation,
            plan,
            raw_plan,
            timings,
            backends: StageBackends {
                despeckle: despeckle_ran,
                features: features_ran,
            },
        })
    }
}

/// Despeckles the frame's imaging region with `filters` and computes its features where
/// `despeckler` runs kernels: on a GPU in one submission with one read-back
/// ([`segment::despeckle_and_features_gpu`]; the despeckling's time is then counted in the
/// features stage, and the returned instant is the start), else stage by stage (the instant
/// between the two). Under `Backend::Auto` a GPU failure runs both stages on the CPU. Returns
/// the despeckled frame, the features, and the backend of each stage. The pipeline and the
/// `segment` command go through here.
#[allow(clippy::type_complexity)]
pub(crate) fn despeckle_and_features(
    despeckler: &Despeckler,
    frame: &Frame,
    filters: &[Filter],
    params: &segment::SegmentParams,
) -> Result<(Array2<f32>, segment::Features, (Ran, Ran), Instant)> {
    #[cfg(feature = "gpu")]
    {
        let start = Instant::now();
        let compute = despeckler.compute();
        if compute.gpu_context().is_some() && segment::one_submission_fits(frame) {
            let ((despeckled, features), ran) = compute.run(
                "despeckling and features",
                |ctx| segment::despeckle_and_features_gpu(ctx, frame, filters, params),
                || {
                    let (d, _) = despeckle_region_with(frame, |img| {
                        crate::despeckle::despeckle_cpu(img, filters)
                    })?;
                    let f = segment::features_cpu(frame, &d, params)?;
                    Ok((d, f))
                },
            )?;
            return Ok((despeckled, features, (ran, ran), start));
        }
    }
    let (despeckled, despeckle_ran) = despeckle_region(despeckler, frame, filters)?;
    let t1 = Instant::now();
    let (features, features_ran) = segment::features(despeckler, frame, &despeckled, params)?;
    Ok((despeckled, features, (despeckle_ran, features_ran), t1))
}

/// Despeckles the frame's imaging region only (its bounding rectangle): the margins around it
/// (the scanner's text, scales and logos) are copied as they are, and cost nothing. The
/// filters see the region's edge as the image's edge (clamp-to-edge), so nothing from the
/// margins bleeds into the image. The pipeline and the `segment` command despeckle this way.
pub(crate) fn despeckle_region(
    despeckler: &Despeckler,
    frame: &Frame,
    filters: &[Filter],
) -> Result<(Array2<f32>, Ran)> {
    despeckle_region_with(frame, |img| despeckler.run_reporting(img, filters))
}

/// [`despeckle_region`] with the despeckling given as `run`.
fn despeckle_region_with<T>(
    frame: &Frame,
    run: impl FnOnce(&Array2<f32>) -> Result<(Array2<f32>, T)>,
) -> Result<(Array2<f32>, T)> {
    let b = frame.region.bounds;
    let (h, w) = frame.intensity.dim();
    if (b.x0, b.y0, b.x1, b.y1) == (0, 0, w, h) || b.width() == 0 || b.height() == 0 {
        return run(&frame.intensity);
    }
    let region = ndarray::s![b.y0..b.y1.min(h), b.x0..b.x1.min(w)];
    let inside = frame.intensity.slice(region).to_owned();
    let (filtered, ran) = run(&inside)?;
    let mut out = frame.intensity.clone();
    out.slice_mut(region).assign(&filtered);
    Ok((out, ran))
}
