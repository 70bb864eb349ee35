//! Despeckling: the speckle filters behind one enum, run on the GPU or the CPU.
//!
//! [`Despeckler`] owns the GPU context (when it has one) so that pipelines and buffers are
//! built once and reused frame after frame. `Backend::Auto` uses a hardware GPU when there is
//! one and falls back to the CPU twins, with a logged warning, if the GPU fails.

use ndarray::Array2;

use crate::gpu::{Backend, Compute, Ran};
use crate::kernels::{frost, lee, median, obnlm, srad};
use crate::Result;

/// A speckle filter with its parameters.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum Filter {
    /// Speckle-reducing anisotropic diffusion.
    Srad(srad::Srad),
    /// Optimized Bayesian non-local means.
    Obnlm(obnlm::Params),
    /// Lee.
    Lee(lee::Params),
    /// Frost.
    Frost(frost::Params),
    /// Median.
    Median(median::Params),
}

/// Names accepted by [`Filter::default_for`].
pub const FILTER_NAMES: [&str; 5] = ["srad", "obnlm", "lee", "frost", "median"];

/// Defaults, tuned on phantoms (see the README's quality table).
pub mod defaults {
    /// SRAD time step.
    pub const SRAD_LAMBDA: f32 = 0.5;
    /// SRAD iterations.
    pub const SRAD_ITERATIONS: u32 = 15;
    /// OBNLM search window.
    pub const OBNLM_SEARCH: u32 = 11;
    /// OBNLM patch.
    pub const OBNLM_PATCH: u32 = 5;
    /// OBNLM smoothing.
    pub const OBNLM_H: f32 = 4.0;
    /// Lee window.
    pub const LEE_WINDOW: u32 = 7;
    /// Speckle coefficient of variation of log-compressed B-mode (about 24 grey levels of
    /// speckle around a mean near 100).
    pub const LEE_NOISE_CV: f32 = 0.25;
    /// Frost window.
    pub const FROST_WINDOW: u32 = 7;
    /// Frost damping.
    pub const FROST_DAMPING: f32 = 2.0;
    /// Median size.
    pub const MEDIAN_SIZE: u32 = 5;
}

impl Filter {
    /// The filter `name` with its default parameters.
    pub fn default_for(name: &str) -> Result<Filter> {
        use defaults::*;
        Ok(match name {
            "srad" => Filter::Srad(srad::Srad::new(SRAD_LAMBDA, SRAD_ITERATIONS)?),
            "obnlm" => Filter::Obnlm(obnlm::Params::new(OBNLM_SEARCH, OBNLM_PATCH, OBNLM_H)?),
            "lee" => Filter::Lee(lee::Params::new(LEE_WINDOW, LEE_NOISE_CV)?),
            "frost" => Filter::Frost(frost::Params::new(FROST_WINDOW, FROST_DAMPING)?),
            "median" => Filter::Median(median::Params::new(MEDIAN_SIZE)?),
            other => {
                return Err(crate::kernels::KernelError::InvalidParameter {
                    name: "filter",
                    reason: format!("unknown filter '{other}' ({})", FILTER_NAMES.join(", ")),
                }
                .into())
            }
        })
    }

    /// The kernel's name.
    pub fn name(&self) -> &'static str {
        match self {
            Filter::Srad(_) => "srad",
            Filter::Obnlm(_) => "obnlm",
            Filter::Lee(_) => "lee",
            Filter::Frost(_) => "frost",
            Filter::Median(_) => "median",
        }
    }

    /// Named parameters, for reports.
    pub fn parameters(&self) -> Vec<(&'static str, f64)> {
        match self {
            Filter::Srad(s) => vec![
                ("lambda", s.params.lambda as f64),
                ("iterations", s.iterations as f64),
            ],
            Filter::Obnlm(p) => vec![
                ("search", (2 * p.search_radius + 1) as f64),
                ("patch", (2 * p.patch_radius + 1) as f64),
                ("h", p.h as f64),
            ],
            Filter::Lee(p) => vec![
                ("window", (2 * p.radius + 1) as f64),
                ("noise_cv", p.noise_cv as f64),
            ],
            Filter::Frost(p) => vec![
                ("window", (2 * p.radius + 1) as f64),
                ("damping", p.damping as f64),
            ],
            Filter::Median(p) => vec![("size", (2 * p.radius + 1) as f64)],
        }
    }

    /// Runs on the CPU: the production path (each kernel's `cpu_fast`, tested against its twin).
    pub fn cpu(&self, img: &Array2<f32>) -> Result<Array2<f32>> {
        match self {
            Filter::Srad(s) => srad::cpu_fast(img, s),
            Filter::Obnlm(p) => obnlm::cpu_fast(img, p),
            Filter::Lee(p) => lee::cpu_fast(img, p),
            Filter::Frost(p) => frost::cpu_fast(img, p),
            Filter::Median(p) => median::cpu_fast(img, p),
        }
    }

    /// Queues the filter on a GPU chain.
    #[cfg(feature = "gpu")]
    pub fn encode(&self, chain: &mut crate::gpu::GpuChain<'_>) -> Result<()> {
        match self {
            Filter::Srad(s) => srad::encode(chain, s),
            Filter::Obnlm(p) => obnlm::encode(chain, p),
            Filter::Lee(p) => lee::encode(chain, p),
            Filter::Frost(p) => frost::encode(chain, p),
            Filter::Median(p) => median::encode(chain, p),
        }
    }
}

/// Runs filters on the chosen backend, keeping GPU state between frames. It derefs to its
/// [`Compute`] (backend, device name, note).
#[derive(Debug, Clone)]
pub struct Despeckler {
    compute: Compute,
}

impl std::ops::Deref for Despeckler {
    type Target = Compute;
    fn deref(&self) -> &Compute {
        &self.compute
    }
}

impl Despeckler {
    /// Opens the backend: `Gpu` fails if there is no adapter; `Auto` quietly uses the CPU when
    /// there is no hardware GPU (see [`Compute::note`]).
    pub fn new(backend: Backend) -> Result<Despeckler> {
        Ok(Despeckler {
            compute: Compute::new(backend)?,
        })
    }

    /// A despeckler on an already open GPU device (several pipelines can share one device: its
    /// chains take turns).
    #[cfg(feature = "gpu")]
    pub fn with_gpu(gpu: std::sync::Arc<crate::gpu::GpuContext>) -> Despeckler {
        Despeckler {
            compute: Compute::with_gpu(gpu),
        }
    }

    /// Where the kernels run.
    pub fn compute(&self) -> &Compute {
        &self.compute
    }

    /// Applies `filters` in order to `img` (on the GPU: one upload, one submit, one read-back).
    pub fn run(&self, img: &Array2<f32>, filters: &[Filter]) -> Result<Array2<f32>> {
        Ok(self.run_reporting(img, filters)?.0)
    }

    /// Like [`Despeckler::run`], also saying which backend actually ran.
    pub fn run_reporting(
        &self,
        img: &Array2<f32>,
        filters: &[Filter],
    ) -> Result<(Array2<f32>, Ran)> {
        self.compute.run(
            "despeckling",
            |ctx| {
                #[cfg(feature = "gpu")]
                {
                    let mut chain = ctx.begin(img)?;
                    for f in filters {
                        f.encode(&mut chain)?;
                    }
                    Ok(chain.finish()?)
                }
                #[cfg(not(feature = "gpu"))]
                match *ctx {}
            },
            || despeckle_cpu(img, filters).map(|(d, _)| d),
        )
    }
}

/// Applies `filters` in order to `img` on the CPU (the second value says so).
pub(crate) fn despeckle_cpu(img: &Array2<f32>, filters: &[Filter]) -> Result<(Array2<f32>, Ran)> {
    let Some((first, rest)) = filters.split_first() else {
        return Ok((img.clone(), Ran::Cpu));
    };
    let mut cur = first.cpu(img)?;
    for f in rest {
        cur = f.cpu(&cur)?;
    }
    Ok((cur, Ran::Cpu))
}
