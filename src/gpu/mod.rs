//! The GPU compute machinery: a headless wgpu context, kernels compiled once and cached by
//! name, per-size buffers reused across frames, and a chain that keeps a frame on the GPU
//! through several kernels (ping-pong buffers) with one submit and one read-back.
//!
//! Every kernel shares one bind group layout (keep in sync with `shaders/common.wgsl`):
//! 0 uniform params (dynamic offset, one 256-byte slot per dispatch), 1 `src` (read),
//! 2 `dst` (read-write), 3 `aux` (read-write scratch image), 4 `stats` (read-write: scalars, then per-workgroup partial sums).
//! So bind groups depend only on the frame size and the ping-pong direction, and are built
//! once per size.
// Without the gpu feature the caches below have no user: the context they serve is absent.
#![cfg_attr(not(feature = "gpu"), allow(dead_code))]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ndarray::Array2;

/// Bytes per uniform slot: wgpu's minimum uniform buffer offset alignment is at most 256.
pub const PARAMS_SLOT_BYTES: u64 = 256;
/// Most dispatches one frame may chain before a submit (SRAD at 100 iterations uses 300).
pub const MAX_DISPATCHES: usize = 1024;
/// Floats in the `stats` buffer: 4 scalars, then two partial sums per 16 × 16 workgroup of
/// the largest frame the device accepts (8192 × 8192).
pub const STATS_LEN: u64 = 4 + 2 * (8192 / 16) * (8192 / 16);
/// Workgroup edge of the 2-D kernels (16 × 16 threads).
pub const WORKGROUP: u32 = 16;
/// Frame sizes whose buffers are kept; the oldest is dropped past this.
const MAX_CACHED_SIZES: usize = 4;
/// Environment variable naming the adapter to use (a case-insensitive part of its name).
pub const ADAPTER_ENV: &str = "SONOGUIDE_ADAPTER";

/// GPU errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GpuError {
    /// No adapter matched the request.
    #[error("no GPU adapter available{0}")]
    NoAdapter(String),
    /// The device could not be created.
    #[error("cannot create a device on {adapter}: {reason}")]
    Device {
        /// Adapter name.
        adapter: String,
        /// What wgpu said.
        reason: String,
    },
    /// A kernel failed (validation, out of memory, device lost).
    #[error("kernel {kernel}: {reason}")]
    Kernel {
        /// Kernel name.
        kernel: String,
        /// What went wrong.
        reason: String,
    },
    /// The frame does not fit the device's limits.
    #[error("frame {width}x{height} exceeds the device's limits: {reason}")]
    TooLarge {
        /// Columns.
        width: usize,
        /// Rows.
        height: usize,
        /// Which limit.
        reason: String,
    },
    /// This build has no GPU support (feature `gpu` off).
    #[error("built without the gpu feature")]
    NotBuilt,
}

/// Which implementation runs the kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// A hardware GPU when there is one, else the CPU twins.
    #[default]
    Auto,
    /// Any wgpu adapter, the software Vulkan adapter (lavapipe) included; an error when none.
    Gpu,
    /// The CPU twins.
    Cpu,
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Backend::Auto),
            "gpu" => Ok(Backend::Gpu),
            "cpu" => Ok(Backend::Cpu),
            other => Err(format!("unknown backend '{other}' (auto, gpu, cpu)")),
        }
    }
}

/// What wgpu reports about an adapter.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdapterSummary {
    /// Adapter name.
    pub name: String,
    /// Backend (Vulkan, Metal, DX12, GL).
    pub backend: String,
    /// Device type (DiscreteGpu, IntegratedGpu, Cpu, …).
    pub device_type: String,
    /// Driver name and version.
    pub driver: String,
    /// Largest storage buffer binding, bytes.
    pub max_storage_buffer_binding_size: u64,
    /// Largest workgroup size along x.
    pub max_compute_workgroup_size_x: u32,
    /// Whether `Backend::Auto` would use it (a hardware GPU).
    pub hardware: bool,
}

mod compute;
pub use compute::{Compute, Ran};

#[cfg(feature = "gpu")]
mod context;
#[cfg(feature = "gpu")]
pub use context::{GpuChain, GpuContext, Layout, Reserved, MAX_STREAMS};

/// Without the `gpu` feature there is no GPU context: the type has no values, so GPU code paths
/// type-check and can never run.
#[cfg(not(feature = "gpu"))]
#[derive(Debug)]
pub enum GpuContext {}

#[cfg(feature = "gpu")]
/// Lists the adapters wgpu sees.
pub fn list_adapters() -> Vec<AdapterSummary> {
    context::list_adapters()
}

#[cfg(not(feature = "gpu"))]
/// Lists the adapters wgpu sees (none: built without the gpu feature).
pub fn list_adapters() -> Vec<AdapterSummary> {
    Vec::new()
}

/// Kernel source: `shaders/common.wgsl` followed by the kernel's own file.
pub fn shader_source(kernel_file: &str) -> String {
    format!(
        "{}\n{}",
        include_str!("../../shaders/common.wgsl"),
        kernel_file
    )
}

/// Per-size buffer cache keyed by (width, height), oldest dropped first.
#[derive(Debug)]
pub(crate) struct SizeCache<T> {
    entries: Mutex<Vec<SizeEntry<T>>>,
}

/// One cached size: (width, height) and what was built for it.
type SizeEntry<T> = ((usize, usize), Arc<T>);

impl<T> Default for SizeCache<T> {
    fn default() -> Self {
        SizeCache {
            entries: Mutex::new(Vec::new()),
        }
    }
}

impl<T> SizeCache<T> {
    pub(crate) fn get_or_try_insert<E>(
        &self,
        key: (usize, usize),
        make: impl FnOnce() -> Result<T, E>,
    ) -> Result<Arc<T>, E> {
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pos) = e.iter().position(|(k, _)| *k == key) {
            let item = e.remove(pos);
            let v = item.1.clone();
            e.push(item);
            return Ok(v);
        }
        let v = Arc::new(make()?);
        e.push((key, v.clone()));
        if e.len() > MAX_CACHED_SIZES {
            e.remove(0);
        }
        Ok(v)
    }
    /// The entry for `key`, if cached (without marking it used).
    pub(crate) fn peek(&self, key: (usize, usize)) -> Option<Arc<T>> {
        let e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone())
    }
    pub(crate) fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }
}

/// Pipeline cache keyed by entry-point name.
pub(crate) type NameCache<T> = Mutex<HashMap<&'static str, Arc<T>>>;

/// Converts an image to the flat row-major f32 buffer kernels read.
pub fn to_flat(img: &Array2<f32>) -> Vec<f32> {
    img.iter().copied().collect()
}
