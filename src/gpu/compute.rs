//! [`Compute`]: where kernels run. It holds the GPU context when there is one, remembers
//! whether a GPU failure may fall back to the CPU (`Backend::Auto`), and reports which backend
//! actually ran each piece of work, so that callers never claim a GPU run that fell back.

use serde::Serialize;

use super::Backend;
#[cfg(not(feature = "gpu"))]
use super::GpuError;
use crate::Result;

/// The backend that actually ran a piece of work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ran {
    /// The GPU.
    Gpu,
    /// The CPU (asked for, no GPU found, or a GPU failure under `Backend::Auto`).
    Cpu,
}

impl Ran {
    /// `"gpu"` or `"cpu"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Ran::Gpu => "gpu",
            Ran::Cpu => "cpu",
        }
    }
}

/// Where kernels run: built once, shared by every stage of a pipeline.
#[derive(Clone)]
pub struct Compute {
    backend: Backend,
    #[cfg(feature = "gpu")]
    gpu: Option<std::sync::Arc<super::GpuContext>>,
    note: Option<String>,
}

impl std::fmt::Debug for Compute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compute")
            .field("backend", &self.backend)
            .field("device", &self.device_name())
            .finish()
    }
}

impl Compute {
    /// Opens the backend: `Gpu` fails if there is no adapter; `Auto` uses the CPU when there is
    /// no hardware GPU, and says so in [`Compute::note`].
    pub fn new(backend: Backend) -> Result<Compute> {
        #[cfg(feature = "gpu")]
        {
            let (gpu, note) = match backend {
                Backend::Cpu => (None, None),
                Backend::Gpu => (
                    Some(std::sync::Arc::new(super::GpuContext::new(Backend::Gpu)?)),
                    None,
                ),
                Backend::Auto => match super::GpuContext::new(Backend::Auto) {
                    Ok(c) => (Some(std::sync::Arc::new(c)), None),
                    Err(e) => (None, Some(format!("using the CPU: {e}"))),
                },
            };
            Ok(Compute { backend, gpu, note })
        }
        #[cfg(not(feature = "gpu"))]
        {
            if backend == Backend::Gpu {
                return Err(GpuError::NotBuilt.into());
            }
            Ok(Compute {
                backend,
                note: None,
            })
        }
    }

    /// Kernels on an already open GPU device (several pipelines can share one device).
    #[cfg(feature = "gpu")]
    pub fn with_gpu(gpu: std::sync::Arc<super::GpuContext>) -> Compute {
        Compute {
            backend: Backend::Gpu,
            gpu: Some(gpu),
            note: None,
        }
    }

    /// The backend asked for.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The shared handle of the GPU device, if the GPU runs.
    #[cfg(feature = "gpu")]
    pub fn gpu_handle(&self) -> Option<std::sync::Arc<super::GpuContext>> {
        self.gpu.clone()
    }

    /// The GPU context, if the GPU runs.
    #[cfg(feature = "gpu")]
    pub fn gpu_context(&self) -> Option<&super::GpuContext> {
        self.gpu.as_deref()
    }

    /// Whether a GPU failure falls back to the CPU (`Backend::Auto`).
    pub fn falls_back(&self) -> bool {
        self.backend == Backend::Auto
    }

    /// Why the backend differs from what was asked for, if it does.
    pub fn note(&self) -> Option<&str> {
        self.note.as_deref()
    }

    /// `"gpu"` when a GPU context is open, else `"cpu"`: what work is sent to first. What
    /// actually ran is reported per call by [`Compute::run`].
    pub fn backend_name(&self) -> &'static str {
        #[cfg(feature = "gpu")]
        if self.gpu.is_some() {
            return "gpu";
        }
        "cpu"
    }

    /// The adapter's name, or `"cpu"`.
    pub fn device_name(&self) -> String {
        #[cfg(feature = "gpu")]
        if let Some(g) = &self.gpu {
            return g.adapter_name().to_string();
        }
        "cpu".to_string()
    }

    /// Runs `on_gpu` when a GPU context is open, else `on_cpu`. Under `Backend::Auto` a GPU
    /// error is logged and the work runs on the CPU instead. Returns the result and the backend
    /// that produced it.
    pub fn run<T>(
        &self,
        what: &str,
        on_gpu: impl FnOnce(&super::GpuContext) -> Result<T>,
        on_cpu: impl FnOnce() -> Result<T>,
    ) -> Result<(T, Ran)> {
        #[cfg(feature = "gpu")]
        if let Some(ctx) = &self.gpu {
            match on_gpu(ctx) {
                Ok(out) => return Ok((out, Ran::Gpu)),
                Err(e @ crate::Error::Gpu(_)) if self.falls_back() => {
                    log::warn!("GPU {what} failed, running on the CPU: {e}");
                }
                Err(e) => return Err(e),
            }
        }
        #[cfg(not(feature = "gpu"))]
        let _ = on_gpu;
        let _ = what;
        Ok((on_cpu()?, Ran::Cpu))
    }
}
