//! The wgpu context and the per-frame chain.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ndarray::Array2;

use super::{
    AdapterSummary, Backend, GpuError, NameCache, SizeCache, ADAPTER_ENV, MAX_DISPATCHES,
    PARAMS_SLOT_BYTES, STATS_LEN, WORKGROUP,
};

/// A compiled kernel entry point.
#[derive(Debug)]
struct Kernel {
    pipeline: wgpu::ComputePipeline,
}

/// Which bind group layout a kernel uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// The common one: params, src, dst, aux, stats.
    Common,
    /// The FFT one (phase symmetry): params, src, out image, spectrum, work, accum.
    Fft,
}

/// Bindings of the FFT layout (keep in sync with the shaders that use it).
const FFT_OUT: u32 = 5;
const FFT_SPECTRUM: u32 = 6;
const FFT_WORK: u32 = 7;
const FFT_ACCUM: u32 = 8;
/// A kernel's precomputed filter bank (one plane of the padded size per filter), kept with
/// the FFT buffers and refilled only when its key changes ([`GpuChain::fft_bank`]).
const FFT_BANK: u32 = 9;

/// The FFT buffers of a frame size: the padded size they were made for, and them.
type FftSlot = ((usize, usize), Arc<FftBuffers>);

/// Buffers of the FFT layout for one frame size.
#[derive(Debug)]
struct FftBuffers {
    /// Bind group reading images[i] and writing images[1 − i].
    groups: [wgpu::BindGroup; 2],
    /// Planes the bank holds.
    bank_planes: usize,
    /// What the bank holds: the key of the last submitted fill, `None` before any (or after
    /// a fill that was queued but never submitted).
    bank_key: Mutex<Option<u64>>,
}

/// Buffers and bind groups for one frame size, reused frame after frame.
#[derive(Debug)]
struct FrameBuffers {
    width: usize,
    height: usize,
    images: [wgpu::Buffer; 2],
    aux: wgpu::Buffer,
    stats: wgpu::Buffer,
    staging: wgpu::Buffer,
    /// Made on first use by [`GpuChain::finish_with_aux`]: a set that never reads its `aux`
    /// back (the classifier's stacked planes) does not hold a second frame-sized staging
    /// buffer.
    aux_staging: std::sync::OnceLock<wgpu::Buffer>,
    stats_staging: wgpu::Buffer,
    params: wgpu::Buffer,
    /// Bind group reading images[i] and writing images[1 - i].
    groups: [wgpu::BindGroup; 2],
    /// FFT buffers, made on first use: (padded width, padded height) and the buffers.
    fft: Mutex<Option<FftSlot>>,
    /// Made on first use by a chain with several outputs ([`GpuChain::keep_input`]).
    kept: Mutex<Option<Arc<KeptBuffers>>>,
    /// Where the passes' timestamps go, on a device that writes them.
    queries: Option<Queries>,
}

/// Two timestamps per dispatch slot (start and end of its pass), resolved and read back
/// when a timed chain ends.
#[derive(Debug)]
struct Queries {
    set: wgpu::QuerySet,
    resolved: wgpu::Buffer,
    staging: wgpu::Buffer,
}

/// Timestamps per chain: two per dispatch.
const QUERIES: u32 = 2 * MAX_DISPATCHES as u32;

/// Most chains of one frame size in flight at once: each has a buffer set of its own (made on
/// first need, reused after), so that streams sharing the device (pipelines on several threads)
/// overlap; a further chain waits until a set is returned.
pub const MAX_STREAMS: usize = 4;

/// The buffer sets of one frame size: the free ones, and how many were made.
#[derive(Debug, Default)]
struct BufferPool {
    sets: Mutex<(Vec<Arc<FrameBuffers>>, usize)>,
    returned: std::sync::Condvar,
}

/// A buffer set lent to one chain, returned to its pool when the chain ends.
#[derive(Debug)]
struct Lease {
    pool: Arc<BufferPool>,
    bufs: Arc<FrameBuffers>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut sets = self.pool.sets.lock().unwrap_or_else(|e| e.into_inner());
        sets.0.push(self.bufs.clone());
        self.pool.returned.notify_one();
    }
}

/// A buffer set leased ahead of need ([`GpuContext::reserve`]), for a chain to go on in
/// later ([`GpuChain::continue_in`]); returned to its pool when dropped unused.
pub struct Reserved {
    lease: Lease,
}

impl Reserved {
    /// Values per image of the set.
    pub fn len(&self) -> usize {
        self.lease.bufs.width * self.lease.bufs.height
    }

    /// Whether the set's images are empty (never: sets are made for non-empty sizes).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Most maps one chain can set aside for its single read-back.
pub const MAX_OUTPUTS: usize = 4;

/// The buffers of a chain with several outputs: the uploaded frame kept aside, so that several
/// kernel chains can start from it, and the maps they set aside, read back together.
#[derive(Debug)]
struct KeptBuffers {
    input: wgpu::Buffer,
    outputs: wgpu::Buffer,
    staging: wgpu::Buffer,
}

/// A headless wgpu device with its kernels and buffers.
pub struct GpuContext {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    layout: wgpu::BindGroupLayout,
    pipeline_layout: wgpu::PipelineLayout,
    fft_layout: wgpu::BindGroupLayout,
    fft_pipeline_layout: wgpu::PipelineLayout,
    kernels: NameCache<Kernel>,
    modules: Mutex<HashMap<&'static str, Arc<wgpu::ShaderModule>>>,
    /// Buffer sets per frame size (at most [`MAX_STREAMS`] each).
    sizes: SizeCache<BufferPool>,
    /// Validation errors the device reported (chains of several threads share it: an error is
    /// reported by the chain that finishes next, which may not be the one that caused it).
    errors: Arc<Mutex<Vec<String>>>,
    /// Nanoseconds per timestamp tick, when the device writes timestamps (`TIMESTAMP_QUERY`).
    timestamp_period: Option<f32>,
    /// Whether chains write a timestamp around every pass ([`GpuContext::set_timing`]).
    timing: std::sync::atomic::AtomicBool,
    /// GPU time per shader file since the last [`GpuContext::take_gpu_times`]: nanoseconds and
    /// passes.
    gpu_times: Mutex<std::collections::BTreeMap<&'static str, (f64, u64)>>,
    /// Buffers mapped back to the host since the context was made: every time data leaves
    /// the GPU.
    readbacks: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext")
            .field("adapter", &self.info.name)
            .finish_non_exhaustive()
    }
}

fn summary(a: &wgpu::Adapter) -> AdapterSummary {
    let info = a.get_info();
    let limits = a.limits();
    AdapterSummary {
        name: info.name.clone(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        driver: format!("{} {}", info.driver, info.driver_info)
            .trim()
            .to_string(),
        max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
        max_compute_workgroup_size_x: limits.max_compute_workgroup_size_x,
        hardware: is_hardware(&info),
    }
}

fn is_hardware(info: &wgpu::AdapterInfo) -> bool {
    matches!(
        info.device_type,
        wgpu::DeviceType::DiscreteGpu
            | wgpu::DeviceType::IntegratedGpu
            | wgpu::DeviceType::VirtualGpu
    )
}

fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    // Compute only: Vulkan, Metal and DX12 (GL has no compute on many drivers).
    desc.backends = wgpu::Backends::PRIMARY;
    wgpu::Instance::new(desc)
}

pub(super) fn list_adapters() -> Vec<AdapterSummary> {
    let inst = instance();
    pollster::block_on(inst.enumerate_adapters(wgpu::Backends::PRIMARY))
        .iter()
        .map(summary)
        .collect()
}

impl GpuContext {
    /// Opens a device. `Backend::Gpu` takes any adapter (software ones too); `Backend::Auto`
    /// only a hardware GPU; `Backend::Cpu` is refused (there is nothing to open). The
    /// `SONOGUIDE_ADAPTER` environment variable picks an adapter by part of its name.
    pub fn new(backend: Backend) -> Result<GpuContext, GpuError> {
        if backend == Backend::Cpu {
            return Err(GpuError::NoAdapter(
                ": the CPU backend was asked for".into(),
            ));
        }
        let inst = instance();
        let adapters = pollster::block_on(inst.enumerate_adapters(wgpu::Backends::PRIMARY));
        let wanted = std::env::var(ADAPTER_ENV)
            .ok()
            .filter(|s| !s.is_empty())
            .map(|s| s.to_lowercase());
        let mut candidates: Vec<wgpu::Adapter> = adapters
            .into_iter()
            .filter(|a| {
                let info = a.get_info();
                let name_ok = wanted
                    .as_ref()
                    .is_none_or(|w| info.name.to_lowercase().contains(w.as_str()));
                let kind_ok = backend == Backend::Gpu || is_hardware(&info);
                name_ok && kind_ok
            })
            .collect();
        // Prefer discrete, then integrated, then anything else.
        candidates.sort_by_key(|a| match a.get_info().device_type {
            wgpu::DeviceType::DiscreteGpu => 0,
            wgpu::DeviceType::IntegratedGpu => 1,
            wgpu::DeviceType::VirtualGpu => 2,
            _ => 3,
        });
        let Some(adapter) = candidates.into_iter().next() else {
            let why = match (&wanted, backend) {
                (Some(w), _) => format!(" matching {ADAPTER_ENV}='{w}'"),
                (None, Backend::Auto) => " (no hardware GPU)".to_string(),
                _ => " (install a Vulkan driver, e.g. Debian's mesa-vulkan-drivers)".to_string(),
            };
            return Err(GpuError::NoAdapter(why));
        };
        let info = adapter.get_info();
        let adapter_limits = adapter.limits();
        // Timestamps around passes where the adapter has them (for `bench`; off unless asked).
        let timestamps = adapter.features() & wgpu::Features::TIMESTAMP_QUERY;
        let mut limits = wgpu::Limits::downlevel_defaults();
        limits.max_storage_buffer_binding_size = adapter_limits.max_storage_buffer_binding_size;
        limits.max_buffer_size = adapter_limits.max_buffer_size;
        // The FFT layout binds five storage buffers; every Vulkan, Metal and DX12 device has 8.
        limits.max_storage_buffers_per_shader_stage =
            adapter_limits.max_storage_buffers_per_shader_stage.min(8);
        limits.max_compute_workgroup_storage_size =
            adapter_limits.max_compute_workgroup_storage_size.min(32768);
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("sonoguide"),
            required_features: timestamps,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| GpuError::Device {
            adapter: info.name.clone(),
            reason: e.to_string(),
        })?;
        let timestamp_period = (!timestamps.is_empty()).then(|| queue.get_timestamp_period());
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            if let Ok(mut v) = sink.lock() {
                v.push(e.to_string());
            }
        }));
        let storage = |binding, read_only| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage { read_only },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("sonoguide.layout"),
            entries: &[
                wgpu::BindGroupLayoutEntry {
                    binding: 0,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: true,
                        min_binding_size: wgpu::BufferSize::new(PARAMS_SLOT_BYTES),
                    },
                    count: None,
                },
                storage(1, true),
                storage(2, false),
                storage(3, false),
                storage(4, false),
            ],
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("sonoguide.pipeline_layout"),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let fft_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("sonoguide.fft_layout"),
            entries: &[
                wgpu::BindGroupLayoutEntry {
                    binding: 0,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: true,
                        min_binding_size: wgpu::BufferSize::new(PARAMS_SLOT_BYTES),
                    },
                    count: None,
                },
                storage(1, true),
                storage(FFT_OUT, false),
                storage(FFT_SPECTRUM, false),
                storage(FFT_WORK, false),
                storage(FFT_ACCUM, false),
                storage(FFT_BANK, false),
            ],
        });
        let fft_pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("sonoguide.fft_pipeline_layout"),
            bind_group_layouts: &[Some(&fft_layout)],
            immediate_size: 0,
        });
        Ok(GpuContext {
            device,
            queue,
            info,
            limits,
            layout,
            pipeline_layout,
            fft_layout,
            fft_pipeline_layout,
            kernels: Mutex::default(),
            modules: Mutex::default(),
            sizes: SizeCache::default(),
            errors,
            timestamp_period,
            timing: std::sync::atomic::AtomicBool::new(false),
            gpu_times: Mutex::default(),
            readbacks: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The adapter's name.
    pub fn adapter_name(&self) -> &str {
        &self.info.name
    }

    /// The adapter's device type, e.g. `Cpu` for lavapipe.
    pub fn device_type(&self) -> String {
        format!("{:?}", self.info.device_type)
    }

    /// How many buffers have been read back to the host so far (for tests and benches that
    /// count how often a frame leaves the GPU).
    pub fn readbacks(&self) -> u64 {
        self.readbacks.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the device writes timestamps (`TIMESTAMP_QUERY`), so that [`Self::set_timing`]
    /// can measure GPU time.
    pub fn timestamps_supported(&self) -> bool {
        self.timestamp_period.is_some()
    }

    /// Turns GPU timing on or off for the chains begun after: with it on, every pass writes a
    /// timestamp at its start and end, and [`Self::take_gpu_times`] sums them per shader.
    /// Returns whether timing is on (false where the device has no timestamps).
    pub fn set_timing(&self, on: bool) -> bool {
        let on = on && self.timestamps_supported();
        self.timing.store(on, std::sync::atomic::Ordering::Relaxed);
        on
    }

    /// GPU time per shader file (the stem, e.g. `srad`) since the last call, in milliseconds,
    /// with the passes counted; empty unless [`Self::set_timing`] was on.
    pub fn take_gpu_times(&self) -> std::collections::BTreeMap<String, (f64, u64)> {
        let mut t = self.gpu_times.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *t)
            .into_iter()
            .map(|(k, (ns, passes))| (k.to_string(), (ns / 1e6, passes)))
            .collect()
    }

    /// How many frame sizes have buffers allocated (for tests of buffer reuse).
    pub fn cached_sizes(&self) -> usize {
        self.sizes.len()
    }

    /// How many buffer sets have been made for frames of `width` × `height` (one per chain in
    /// flight at once, at most [`MAX_STREAMS`]; for tests of buffer reuse).
    pub fn buffer_sets(&self, width: usize, height: usize) -> usize {
        self.sizes
            .peek((width, height))
            .map_or(0, |p| p.sets.lock().map_or(0, |s| s.1))
    }

    /// How many kernel pipelines have been compiled.
    pub fn compiled_kernels(&self) -> usize {
        self.kernels.lock().map(|k| k.len()).unwrap_or(0)
    }

    fn take_error(&self, kernel: &str) -> Result<(), GpuError> {
        let mut e = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        if e.is_empty() {
            return Ok(());
        }
        let reason = e.join("; ");
        e.clear();
        Err(GpuError::Kernel {
            kernel: kernel.to_string(),
            reason,
        })
    }

    /// The pipeline for `entry` in the shader `file` (`shaders/<file>.wgsl` source given),
    /// compiled on first use.
    fn kernel(
        &self,
        file: &'static str,
        source: &'static str,
        entry: &'static str,
        layout: Layout,
    ) -> Result<Arc<Kernel>, GpuError> {
        let mut cache = self.kernels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = cache.get(entry) {
            return Ok(k.clone());
        }
        let module = {
            let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
            match modules.get(file) {
                Some(m) => m.clone(),
                None => {
                    let m = Arc::new(self.device.create_shader_module(
                        wgpu::ShaderModuleDescriptor {
                            label: Some(file),
                            source: wgpu::ShaderSource::Wgsl(Cow::Owned(super::shader_source(
                                source,
                            ))),
                        },
                    ));
                    modules.insert(file, m.clone());
                    m
                }
            }
        };
        let label = format!("sonoguide.{entry}");
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&label),
                layout: Some(match layout {
                    Layout::Common => &self.pipeline_layout,
                    Layout::Fft => &self.fft_pipeline_layout,
                }),
                module: &module,
                entry_point: Some(entry),
                compilation_options: Default::default(),
                cache: None,
            });
        self.take_error(entry)?;
        let k = Arc::new(Kernel { pipeline });
        cache.insert(entry, k.clone());
        Ok(k)
    }

    /// Lends a buffer set for frames of `width` × `height`: a free one, a new one while fewer
    /// than [`MAX_STREAMS`] exist, or else the next one returned.
    fn lease(&self, width: usize, height: usize) -> Result<Lease, GpuError> {
        self.check_size(width, height)?;
        let pool = self
            .sizes
            .get_or_try_insert((width, height), || Ok::<_, GpuError>(BufferPool::default()))?;
        let mut sets = pool.sets.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(bufs) = sets.0.pop() {
                drop(sets);
                return Ok(Lease { pool, bufs });
            }
            if sets.1 < MAX_STREAMS {
                sets.1 += 1;
                drop(sets);
                return match self.make_buffers(width, height) {
                    Ok(b) => Ok(Lease {
                        pool,
                        bufs: Arc::new(b),
                    }),
                    Err(e) => {
                        pool.sets.lock().unwrap_or_else(|e| e.into_inner()).1 -= 1;
                        Err(e)
                    }
                };
            }
            sets = pool.returned.wait(sets).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Whether the device can hold and dispatch over frames of `width` × `height`.
    fn check_size(&self, width: usize, height: usize) -> Result<(), GpuError> {
        let bytes = (width * height * 4) as u64;
        if width == 0 || height == 0 || bytes > self.limits.max_storage_buffer_binding_size {
            return Err(GpuError::TooLarge {
                width,
                height,
                reason: format!(
                    "{} bytes per image, binding limit {}",
                    bytes, self.limits.max_storage_buffer_binding_size
                ),
            });
        }
        // Dispatch counts per dimension are limited too.
        let groups = (width as u32)
            .div_ceil(WORKGROUP)
            .max((height as u32).div_ceil(WORKGROUP));
        let tiles =
            (width as u64).div_ceil(WORKGROUP as u64) * (height as u64).div_ceil(WORKGROUP as u64);
        if groups > self.limits.max_compute_workgroups_per_dimension || 4 + 2 * tiles > STATS_LEN {
            return Err(GpuError::TooLarge {
                width,
                height,
                reason: "too many workgroups".into(),
            });
        }
        Ok(())
    }

    /// A new buffer set for frames of `width` × `height` (checked by [`Self::check_size`]).
    fn make_buffers(&self, width: usize, height: usize) -> Result<FrameBuffers, GpuError> {
        let bytes = (width * height * 4) as u64;
        {
            let buffer = |label, size| {
                self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(label),
                    size,
                    usage: wgpu::BufferUsages::STORAGE
                        | wgpu::BufferUsages::COPY_SRC
                        | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                })
            };
            let images = [
                buffer("sonoguide.image.a", bytes),
                buffer("sonoguide.image.b", bytes),
            ];
            let aux = buffer("sonoguide.aux", bytes);
            let stats = buffer("sonoguide.stats", STATS_LEN * 4);
            let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("sonoguide.staging"),
                size: bytes,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let stats_staging = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("sonoguide.stats_staging"),
                size: STATS_LEN * 4,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let params = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("sonoguide.params"),
                size: PARAMS_SLOT_BYTES * MAX_DISPATCHES as u64,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let group = |src: &wgpu::Buffer, dst: &wgpu::Buffer, label| {
                self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some(label),
                    layout: &self.layout,
                    entries: &[
                        wgpu::BindGroupEntry {
                            binding: 0,
                            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                buffer: &params,
                                offset: 0,
                                size: wgpu::BufferSize::new(PARAMS_SLOT_BYTES),
                            }),
                        },
                        wgpu::BindGroupEntry {
                            binding: 1,
                            resource: src.as_entire_binding(),
                        },
                        wgpu::BindGroupEntry {
                            binding: 2,
                            resource: dst.as_entire_binding(),
                        },
                        wgpu::BindGroupEntry {
                            binding: 3,
                            resource: aux.as_entire_binding(),
                        },
                        wgpu::BindGroupEntry {
                            binding: 4,
                            resource: stats.as_entire_binding(),
                        },
                    ],
                })
            };
            let groups = [
                group(&images[0], &images[1], "sonoguide.group.ab"),
                group(&images[1], &images[0], "sonoguide.group.ba"),
            ];
            let fb = FrameBuffers {
                width,
                height,
                images,
                aux,
                stats,
                staging,
                aux_staging: std::sync::OnceLock::new(),
                stats_staging,
                params,
                groups,
                fft: Mutex::new(None),
                kept: Mutex::new(None),
                queries: self.timestamp_period.map(|_| Queries {
                    set: self.device.create_query_set(&wgpu::QuerySetDescriptor {
                        label: Some("sonoguide.timestamps"),
                        ty: wgpu::QueryType::Timestamp,
                        count: QUERIES,
                    }),
                    resolved: self.device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some("sonoguide.timestamps.resolved"),
                        size: u64::from(QUERIES) * 8,
                        usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                        mapped_at_creation: false,
                    }),
                    staging: self.device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some("sonoguide.timestamps.staging"),
                        size: u64::from(QUERIES) * 8,
                        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                        mapped_at_creation: false,
                    }),
                }),
            };
            self.take_error("buffers").map(|_| fb)
        }
    }

    fn kept_buffers(&self, fb: &FrameBuffers) -> Result<Arc<KeptBuffers>, GpuError> {
        let mut slot = fb.kept.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = slot.as_ref() {
            return Ok(b.clone());
        }
        let bytes = (fb.width * fb.height * 4) as u64;
        if bytes * MAX_OUTPUTS as u64 > self.limits.max_buffer_size {
            return Err(GpuError::TooLarge {
                width: fb.width,
                height: fb.height,
                reason: format!(
                    "{MAX_OUTPUTS} maps of {bytes} bytes exceed the buffer limit {}",
                    self.limits.max_buffer_size
                ),
            });
        }
        let buffer = |label, size, usage| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage,
                mapped_at_creation: false,
            })
        };
        let copy = wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
        let b = Arc::new(KeptBuffers {
            input: buffer("sonoguide.kept.input", bytes, copy),
            outputs: buffer("sonoguide.kept.outputs", bytes * MAX_OUTPUTS as u64, copy),
            staging: buffer(
                "sonoguide.kept.staging",
                bytes * MAX_OUTPUTS as u64,
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            ),
        });
        self.take_error("kept buffers")?;
        *slot = Some(b.clone());
        Ok(b)
    }

    fn fft_buffers(
        &self,
        fb: &FrameBuffers,
        pad: (usize, usize),
        bank_planes: usize,
    ) -> Result<Arc<FftBuffers>, GpuError> {
        let mut slot = fb.fft.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((size, b)) = slot.as_ref() {
            if *size == pad && b.bank_planes >= bank_planes {
                return Ok(b.clone());
            }
        }
        let bank_planes = bank_planes.max(1);
        let bank_bytes = (pad.0 * pad.1 * 4 * bank_planes) as u64;
        if bank_bytes > self.limits.max_storage_buffer_binding_size {
            return Err(GpuError::TooLarge {
                width: fb.width,
                height: fb.height,
                reason: format!("a bank of {bank_planes} padded planes exceeds the binding limit"),
            });
        }
        let complex_bytes = (pad.0 * pad.1 * 8) as u64;
        let n = fb.width * fb.height;
        let tiles = fb.width.div_ceil(WORKGROUP as usize) * fb.height.div_ceil(WORKGROUP as usize);
        let accum_bytes = ((3 * n + 4 + tiles) * 4) as u64;
        if complex_bytes > self.limits.max_storage_buffer_binding_size {
            return Err(GpuError::TooLarge {
                width: fb.width,
                height: fb.height,
                reason: "padded FFT exceeds the binding limit".into(),
            });
        }
        let buffer = |label, size| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        };
        let spectrum = buffer("sonoguide.fft.spectrum", complex_bytes);
        let work = buffer("sonoguide.fft.work", complex_bytes);
        let accum = buffer("sonoguide.fft.accum", accum_bytes);
        let bank = buffer("sonoguide.fft.bank", bank_bytes);
        let group = |src: &wgpu::Buffer, dst: &wgpu::Buffer, label| {
            self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(label),
                layout: &self.fft_layout,
                entries: &[
                    wgpu::BindGroupEntry {
                        binding: 0,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: &fb.params,
                            offset: 0,
                            size: wgpu::BufferSize::new(PARAMS_SLOT_BYTES),
                        }),
                    },
                    wgpu::BindGroupEntry {
                        binding: 1,
                        resource: src.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: FFT_OUT,
                        resource: dst.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: FFT_SPECTRUM,
                        resource: spectrum.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: FFT_WORK,
                        resource: work.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: FFT_ACCUM,
                        resource: accum.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: FFT_BANK,
                        resource: bank.as_entire_binding(),
                    },
                ],
            })
        };
        let groups = [
            group(&fb.images[0], &fb.images[1], "sonoguide.fft.group.ab"),
            group(&fb.images[1], &fb.images[0], "sonoguide.fft.group.ba"),
        ];
        self.take_error("fft buffers")?;
        let b = Arc::new(FftBuffers {
            groups,
            bank_planes,
            bank_key: Mutex::new(None),
        });
        *slot = Some((pad, b.clone()));
        Ok(b)
    }

    /// Leases a buffer set for images of `width` × `rows` now, for a chain to go on in later
    /// ([`GpuChain::continue_in`]). A frame's work leases its sets in strictly decreasing
    /// sizes, so that frames waiting for sets cannot wait on each other in a circle: reserve
    /// a set larger than any the chain leases before it goes on in it, and before the chain
    /// begins.
    pub fn reserve(&self, width: usize, rows: usize) -> Result<Reserved, GpuError> {
        Ok(Reserved {
            lease: self.lease(width, rows)?,
        })
    }

    /// Uploads a frame and starts a chain of kernels on it.
    pub fn begin(&self, image: &Array2<f32>) -> Result<GpuChain<'_>, GpuError> {
        let (h, w) = image.dim();
        match image.as_slice() {
            Some(data) => self.begin_planes(data, w, h),
            None => self.begin_planes(&super::to_flat(image), w, h),
        }
    }

    /// Starts a chain on images of `rows` × `width` (e.g. several planes stacked), uploading
    /// `data` (row-major, at most that many values) at the start of the first; the rest of it
    /// holds whatever an earlier frame left there.
    pub fn begin_planes(
        &self,
        data: &[f32],
        width: usize,
        rows: usize,
    ) -> Result<GpuChain<'_>, GpuError> {
        if data.len() > width * rows {
            return Err(GpuError::Kernel {
                kernel: "upload".into(),
                reason: format!("{} values for a {width}x{rows} image", data.len()),
            });
        }
        let lease = self.lease(width, rows)?;
        let bufs = lease.bufs.clone();
        let timed = (self.timing.load(std::sync::atomic::Ordering::Relaxed)
            && bufs.queries.is_some())
        .then(Vec::new);
        self.queue
            .write_buffer(&bufs.images[0], 0, bytemuck::cast_slice(data));
        let encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("sonoguide.frame"),
            });
        let _ = &bufs.aux;
        Ok(GpuChain {
            ctx: self,
            bufs,
            current: 0,
            encoder,
            params: Vec::new(),
            last_kernel: "upload",
            fft: None,
            kept: None,
            _lease: lease,
            timed,
            staged: None,
            earlier: Vec::new(),
            bank_fills: Vec::new(),
        })
    }
}

/// A frame on the GPU and the kernels queued on it. Nothing runs until [`GpuChain::finish`].
pub struct GpuChain<'a> {
    ctx: &'a GpuContext,
    bufs: Arc<FrameBuffers>,
    /// Which image buffer holds the current frame.
    current: usize,
    encoder: wgpu::CommandEncoder,
    params: Vec<u8>,
    last_kernel: &'static str,
    fft: Option<Arc<FftBuffers>>,
    kept: Option<Arc<KeptBuffers>>,
    /// The buffer set, returned to its pool when the chain ends.
    _lease: Lease,
    /// The shader file of every pass, when the chain writes timestamps.
    timed: Option<Vec<&'static str>>,
    /// An image set aside by [`GpuChain::stage`], read back with the chain's results.
    staged: Option<Staged>,
    /// The buffer sets of the chains this one continues ([`GpuChain::hand_over`]): held
    /// until the submission has completed, with their passes' timestamps to collect.
    earlier: Vec<Earlier>,
    /// Filter banks this chain fills ([`GpuChain::fft_bank`]), with their keys.
    bank_fills: Vec<(Arc<FftBuffers>, u64)>,
}

/// The maps a chain set aside, and the image it staged, if any.
type OutputsAndStaged = (Vec<Array2<f32>>, Option<Array2<f32>>);

/// An image copied into its buffer set's staging buffer by [`GpuChain::stage`].
struct Staged {
    bufs: Arc<FrameBuffers>,
    width: usize,
    height: usize,
}

/// A buffer set whose queued work a later chain took over ([`GpuChain::hand_over`]).
struct Earlier {
    bufs: Arc<FrameBuffers>,
    _lease: Lease,
    timed: Option<Vec<&'static str>>,
}

impl GpuChain<'_> {
    /// Frame width.
    pub fn width(&self) -> usize {
        self.bufs.width
    }
    /// Frame height.
    pub fn height(&self) -> usize {
        self.bufs.height
    }

    /// Queues `entry` of shader `file` over `groups` workgroups with `params`; if `swap`, the
    /// kernel wrote the next image into `dst` and the chain moves on to it.
    pub fn dispatch<P: bytemuck::Pod>(
        &mut self,
        file: &'static str,
        source: &'static str,
        entry: &'static str,
        params: &P,
        groups: (u32, u32),
        swap: bool,
    ) -> Result<(), GpuError> {
        self.dispatch_with(Layout::Common, file, source, entry, params, groups, swap)
    }

    /// Like [`GpuChain::dispatch`] (`file` is the shader's stem), with the FFT layout; `pad` is the padded size the FFT
    /// buffers must have.
    #[allow(clippy::too_many_arguments)]
    pub fn dispatch_fft<P: bytemuck::Pod>(
        &mut self,
        file: &'static str,
        source: &'static str,
        entry: &'static str,
        params: &P,
        pad: (usize, usize),
        groups: (u32, u32),
        swap: bool,
    ) -> Result<(), GpuError> {
        let planes = self.fft.as_ref().map_or(1, |f| f.bank_planes);
        let fft = self.ctx.fft_buffers(&self.bufs, pad, planes)?;
        self.fft = Some(fft);
        self.dispatch_with(Layout::Fft, file, source, entry, params, groups, swap)
    }

    /// Makes sure the FFT buffers of padded size `pad` have a filter bank of `planes` planes
    /// (binding 9 of the FFT layout), and says whether the kernel must fill it: `false` when
    /// the bank already holds what `key` names (the same filters for the same size, filled by
    /// an earlier submission). A fill counts only once its chain has been submitted: a chain
    /// dropped before that leaves the bank marked empty.
    pub fn fft_bank(
        &mut self,
        pad: (usize, usize),
        planes: usize,
        key: u64,
    ) -> Result<bool, GpuError> {
        let fft = self.ctx.fft_buffers(&self.bufs, pad, planes)?;
        let fill = {
            let mut held = fft.bank_key.lock().unwrap_or_else(|e| e.into_inner());
            if *held == Some(key) {
                false
            } else {
                *held = None;
                true
            }
        };
        if fill {
            self.bank_fills.push((fft.clone(), key));
        }
        self.fft = Some(fft);
        Ok(fill)
    }

    #[allow(clippy::too_many_arguments)]
    fn dispatch_with<P: bytemuck::Pod>(
        &mut self,
        layout: Layout,
        file: &'static str,
        source: &'static str,
        entry: &'static str,
        params: &P,
        groups: (u32, u32),
        swap: bool,
    ) -> Result<(), GpuError> {
        let slot = self.params.len() / PARAMS_SLOT_BYTES as usize;
        if slot >= MAX_DISPATCHES {
            return Err(GpuError::Kernel {
                kernel: entry.into(),
                reason: format!("more than {MAX_DISPATCHES} dispatches in one frame"),
            });
        }
        let bytes = bytemuck::bytes_of(params);
        if bytes.len() > PARAMS_SLOT_BYTES as usize {
            return Err(GpuError::Kernel {
                kernel: entry.into(),
                reason: "params larger than a uniform slot".into(),
            });
        }
        self.params.extend_from_slice(bytes);
        self.params
            .resize((slot + 1) * PARAMS_SLOT_BYTES as usize, 0);
        let kernel = self.ctx.kernel(file, source, entry, layout)?;
        {
            let group = match (layout, &self.fft) {
                (Layout::Fft, Some(f)) => &f.groups[self.current],
                _ => &self.bufs.groups[self.current],
            };
            let timestamp_writes = match (&mut self.timed, &self.bufs.queries) {
                (Some(files), Some(q)) => {
                    files.push(file);
                    Some(wgpu::ComputePassTimestampWrites {
                        query_set: &q.set,
                        beginning_of_pass_write_index: Some(2 * slot as u32),
                        end_of_pass_write_index: Some(2 * slot as u32 + 1),
                    })
                }
                _ => None,
            };
            let mut pass = self
                .encoder
                .begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some(entry),
                    timestamp_writes,
                });
            pass.set_pipeline(&kernel.pipeline);
            pass.set_bind_group(0, group, &[(slot as u64 * PARAMS_SLOT_BYTES) as u32]);
            pass.dispatch_workgroups(groups.0.max(1), groups.1.max(1), 1);
        }
        if swap {
            self.current = 1 - self.current;
        }
        self.last_kernel = entry;
        Ok(())
    }

    /// Writes `data` at the start of the `aux` scratch buffer before the chain's kernels run
    /// (a kernel's constant tables, e.g. the pixel classifier's weights).
    pub fn write_aux(&mut self, data: &[f32]) -> Result<(), GpuError> {
        if data.len() > self.bufs.width * self.bufs.height {
            return Err(GpuError::Kernel {
                kernel: "aux upload".into(),
                reason: format!(
                    "{} values for a {}x{} scratch buffer",
                    data.len(),
                    self.bufs.width,
                    self.bufs.height
                ),
            });
        }
        self.ctx
            .queue
            .write_buffer(&self.bufs.aux, 0, bytemuck::cast_slice(data));
        Ok(())
    }

    /// Writes `data` at value offset `at` of the current image before the chain's kernels run
    /// (e.g. a plane the CPU already knows, beside what earlier kernels will copy there).
    pub fn write_image(&mut self, at: usize, data: &[f32]) -> Result<(), GpuError> {
        let image = self.bufs.width * self.bufs.height;
        if at.checked_add(data.len()).is_none_or(|end| end > image) {
            return Err(GpuError::Kernel {
                kernel: "image upload".into(),
                reason: format!("{} values at {at} of an image of {image}", data.len()),
            });
        }
        self.ctx.queue.write_buffer(
            &self.bufs.images[self.current],
            (at * 4) as u64,
            bytemuck::cast_slice(data),
        );
        Ok(())
    }

    /// Dispatches queued so far (each takes one parameter slot).
    pub fn dispatches(&self) -> usize {
        self.params.len() / PARAMS_SLOT_BYTES as usize
    }

    /// The device's limit on workgroups per dimension.
    pub fn max_workgroups(&self) -> u32 {
        self.ctx.limits.max_compute_workgroups_per_dimension
    }

    /// Workgroups covering the frame with 16 × 16 threads.
    pub fn groups_2d(&self) -> (u32, u32) {
        (
            (self.bufs.width as u32).div_ceil(WORKGROUP),
            (self.bufs.height as u32).div_ceil(WORKGROUP),
        )
    }

    /// Keeps the uploaded frame aside on the GPU, so that after one kernel chain has run,
    /// [`GpuChain::restart`] starts the next from it without a second upload. Call it first.
    pub fn keep_input(&mut self) -> Result<(), GpuError> {
        let kept = self.ctx.kept_buffers(&self.bufs)?;
        let bytes = (self.bufs.width * self.bufs.height * 4) as u64;
        self.encoder.copy_buffer_to_buffer(
            &self.bufs.images[self.current],
            0,
            &kept.input,
            0,
            bytes,
        );
        self.kept = Some(kept);
        Ok(())
    }

    /// Sets the current frame aside as output `slot` (and, with `aux`, the `aux` image as
    /// output `slot + 1`), for [`GpuChain::finish_outputs`]. Needs [`GpuChain::keep_input`].
    pub fn set_aside(&mut self, slot: usize, aux: bool) -> Result<(), GpuError> {
        let kept = self.kept_or_err()?;
        let last = slot + usize::from(aux);
        if last >= MAX_OUTPUTS {
            return Err(GpuError::Kernel {
                kernel: self.last_kernel.into(),
                reason: format!("output {last}: a chain sets aside at most {MAX_OUTPUTS} maps"),
            });
        }
        let bytes = (self.bufs.width * self.bufs.height * 4) as u64;
        self.encoder.copy_buffer_to_buffer(
            &self.bufs.images[self.current],
            0,
            &kept.outputs,
            slot as u64 * bytes,
            bytes,
        );
        if aux {
            self.encoder.copy_buffer_to_buffer(
                &self.bufs.aux,
                0,
                &kept.outputs,
                (slot + 1) as u64 * bytes,
                bytes,
            );
        }
        Ok(())
    }

    /// Starts the next kernel chain from the frame kept by [`GpuChain::keep_input`].
    pub fn restart(&mut self) -> Result<(), GpuError> {
        let kept = self.kept_or_err()?;
        let bytes = (self.bufs.width * self.bufs.height * 4) as u64;
        self.encoder
            .copy_buffer_to_buffer(&kept.input, 0, &self.bufs.images[0], 0, bytes);
        self.current = 0;
        Ok(())
    }

    /// Copies `len` values from offset `from` of the next image (where kernels that keep the
    /// chain on its current image write) to offset `to` of the current image, so that a later
    /// kernel reads them as input.
    pub fn copy_to_current(&mut self, from: usize, to: usize, len: usize) -> Result<(), GpuError> {
        let image = self.bufs.width * self.bufs.height;
        if from.max(to).checked_add(len).is_none_or(|end| end > image) {
            return Err(GpuError::Kernel {
                kernel: self.last_kernel.into(),
                reason: format!("copy of {len} values from {from} to {to} in images of {image}"),
            });
        }
        self.encoder.copy_buffer_to_buffer(
            &self.bufs.images[1 - self.current],
            from as u64 * 4,
            &self.bufs.images[self.current],
            to as u64 * 4,
            len as u64 * 4,
        );
        Ok(())
    }

    /// Copies the current image into this buffer set's staging buffer, to be read back by
    /// [`GpuChain::finish_outputs_staged`] together with the chain's outputs (one wait for
    /// both). The chain goes on from the same image.
    pub fn stage(&mut self) -> Result<(), GpuError> {
        let bytes = (self.bufs.width * self.bufs.height * 4) as u64;
        self.encoder.copy_buffer_to_buffer(
            &self.bufs.images[self.current],
            0,
            &self.bufs.staging,
            0,
            bytes,
        );
        self.staged = Some(Staged {
            bufs: self.bufs.clone(),
            width: self.bufs.width,
            height: self.bufs.height,
        });
        Ok(())
    }

    /// Goes on with the queued work on a `width` × `height` buffer set whose first image is
    /// the first `width · height` values of the current image (a kernel that wrote a smaller
    /// image there, packed row-major, e.g. the analysis grid). Nothing is submitted: the work
    /// of both sets goes to the device in one submission when the returned chain finishes,
    /// and this set (with what [`GpuChain::stage`] set aside in it) is held until then.
    pub fn hand_over(mut self, width: usize, height: usize) -> Result<Self, GpuError> {
        let here = (self.bufs.width, self.bufs.height);
        if width * height >= here.0 * here.1 || width * height == 0 {
            // The same size would wait on its own pool (a set of it is held here). Sets are
            // leased in strictly shrinking sizes along a chain, so chains waiting for sets
            // cannot wait on each other in a circle.
            return Err(GpuError::Kernel {
                kernel: self.last_kernel.into(),
                reason: format!(
                    "hand-over from {}x{} to {width}x{height}: needs a smaller, non-empty image",
                    here.0, here.1
                ),
            });
        }
        let lease = self.ctx.lease(width, height)?;
        self.encoder.copy_buffer_to_buffer(
            &self.bufs.images[self.current],
            0,
            &lease.bufs.images[0],
            0,
            (width * height * 4) as u64,
        );
        Ok(self.go_on(lease))
    }

    /// Goes on with the queued work in a set `reserved` earlier ([`GpuContext::reserve`]) of
    /// this chain's width: first `copies` — (what, where) with what this chain kept, its input
    /// ([`GpuChain::keep_input`]) for `None` or its output `slot` ([`GpuChain::set_aside`])
    /// for `Some(slot)`, copied to value offset `where` of the reserved set's first image,
    /// where the chain goes on. Nothing is submitted (as [`GpuChain::hand_over`]).
    pub fn continue_in(
        mut self,
        reserved: Reserved,
        copies: &[(Option<usize>, usize)],
    ) -> Result<Self, GpuError> {
        let lease = reserved.lease;
        let n = self.bufs.width * self.bufs.height;
        let there = lease.bufs.width * lease.bufs.height;
        if lease.bufs.width != self.bufs.width {
            return Err(GpuError::Kernel {
                kernel: self.last_kernel.into(),
                reason: format!(
                    "going on in images {} wide from images {} wide",
                    lease.bufs.width, self.bufs.width
                ),
            });
        }
        let kept = self.kept_or_err()?;
        for &(what, at) in copies {
            let (from, offset) = match what {
                None => (&kept.input, 0),
                Some(slot) if slot < MAX_OUTPUTS => (&kept.outputs, slot * n),
                Some(slot) => {
                    return Err(GpuError::Kernel {
                        kernel: self.last_kernel.into(),
                        reason: format!("output {slot} (at most {MAX_OUTPUTS})"),
                    })
                }
            };
            if at.checked_add(n).is_none_or(|end| end > there) {
                return Err(GpuError::Kernel {
                    kernel: self.last_kernel.into(),
                    reason: format!("a map copied to {at} of images of {there} values"),
                });
            }
            self.encoder.copy_buffer_to_buffer(
                from,
                (offset * 4) as u64,
                &lease.bufs.images[0],
                (at * 4) as u64,
                (n * 4) as u64,
            );
        }
        Ok(self.go_on(lease))
    }

    /// The chain's queued work, going on in `lease`'s set from its first image; this set
    /// (with what [`GpuChain::stage`] set aside in it) is held until the submission.
    fn go_on(mut self, lease: Lease) -> Self {
        let ctx = self.ctx;
        let bufs = lease.bufs.clone();
        self.resolve_timestamps();
        if !self.params.is_empty() {
            // Queue writes land before the submission that carries these passes.
            ctx.queue.write_buffer(&self.bufs.params, 0, &self.params);
        }
        let timed = (ctx.timing.load(std::sync::atomic::Ordering::Relaxed)
            && bufs.queries.is_some())
        .then(Vec::new);
        let mut earlier = std::mem::take(&mut self.earlier);
        earlier.push(Earlier {
            bufs: self.bufs,
            _lease: self._lease,
            timed: self.timed,
        });
        GpuChain {
            ctx,
            bufs,
            current: 0,
            encoder: self.encoder,
            params: Vec::new(),
            last_kernel: self.last_kernel,
            fft: None,
            kept: None,
            _lease: lease,
            timed,
            staged: self.staged,
            earlier,
            bank_fills: self.bank_fills,
        }
    }

    /// Queues the resolve and copy of the passes' timestamps, when the chain is timed.
    fn resolve_timestamps(&mut self) {
        if let (Some(files), Some(q)) = (&self.timed, &self.bufs.queries) {
            let n = 2 * files.len() as u32;
            if n > 0 {
                self.encoder.resolve_query_set(&q.set, 0..n, &q.resolved, 0);
                self.encoder
                    .copy_buffer_to_buffer(&q.resolved, 0, &q.staging, 0, u64::from(n) * 8);
            }
        }
    }

    fn kept_or_err(&self) -> Result<Arc<KeptBuffers>, GpuError> {
        self.kept.clone().ok_or_else(|| GpuError::Kernel {
            kernel: self.last_kernel.into(),
            reason: "the chain did not keep its input (keep_input)".into(),
        })
    }

    /// Submits everything queued, waits, and reads back outputs `0..count` set aside by
    /// [`GpuChain::set_aside`], all in one read-back.
    pub fn finish_outputs(self, count: usize) -> Result<Vec<Array2<f32>>, GpuError> {
        Ok(self.finish_outputs_inner(count)?.0)
    }

    /// Like [`GpuChain::finish_outputs`], and also reads the image [`GpuChain::stage`] set
    /// aside (in this chain or one it took over from), after the same wait: one read-back.
    pub fn finish_outputs_staged(
        self,
        count: usize,
    ) -> Result<(Vec<Array2<f32>>, Array2<f32>), GpuError> {
        let kernel = self.last_kernel;
        match self.finish_outputs_inner(count)? {
            (maps, Some(staged)) => Ok((maps, staged)),
            (_, None) => Err(GpuError::Kernel {
                kernel: kernel.into(),
                reason: "nothing was staged (GpuChain::stage)".into(),
            }),
        }
    }

    fn finish_outputs_inner(mut self, count: usize) -> Result<OutputsAndStaged, GpuError> {
        let kept = self.kept_or_err()?;
        let ctx = self.ctx;
        let kernel = self.last_kernel;
        if count == 0 || count > MAX_OUTPUTS {
            return Err(GpuError::Kernel {
                kernel: kernel.into(),
                reason: format!("{count} outputs (1 to {MAX_OUTPUTS})"),
            });
        }
        let n = self.bufs.width * self.bufs.height;
        let bytes = (n * 4 * count) as u64;
        self.encoder
            .copy_buffer_to_buffer(&kept.outputs, 0, &kept.staging, 0, bytes);
        self.resolve_timestamps();
        if !self.params.is_empty() {
            ctx.queue.write_buffer(&self.bufs.params, 0, &self.params);
        }
        ctx.queue.submit([self.encoder.finish()]);
        commit_bank_fills(&mut self.bank_fills);
        let staged_bytes = self
            .staged
            .as_ref()
            .map(|st| (st.width * st.height * 4) as u64);
        let mut read = match (&self.staged, staged_bytes) {
            (Some(st), Some(b)) => read_ranges(
                ctx,
                &[(&kept.staging, bytes), (&st.bufs.staging, b)],
                kernel,
            )?,
            _ => read_ranges(ctx, &[(&kept.staging, bytes)], kernel)?,
        };
        ctx.take_error(kernel)?;
        collect_timestamps(ctx, &self.bufs, self.timed.as_deref(), kernel)?;
        for e in &self.earlier {
            collect_timestamps(ctx, &e.bufs, e.timed.as_deref(), kernel)?;
        }
        let err = |e: ndarray::ShapeError| GpuError::Kernel {
            kernel: kernel.into(),
            reason: e.to_string(),
        };
        let staged = match (&self.staged, read.len()) {
            (Some(st), 2) => Some(
                Array2::from_shape_vec((st.height, st.width), read.pop().unwrap_or_default())
                    .map_err(err)?,
            ),
            _ => None,
        };
        let all = read.pop().unwrap_or_default();
        let shape = (self.bufs.height, self.bufs.width);
        let maps = all
            .chunks_exact(n.max(1))
            .take(count)
            .map(|c| Array2::from_shape_vec(shape, c.to_vec()).map_err(err))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((maps, staged))
    }

    /// Submits everything queued, waits, and reads values `first..first + len` of the current
    /// image back (e.g. a few planes of a stack), in one read-back.
    pub fn finish_range(self, first: usize, len: usize) -> Result<Vec<f32>, GpuError> {
        Ok(self.finish_range_inner(first, len)?.0)
    }

    /// Like [`GpuChain::finish_range`], and also reads the image [`GpuChain::stage`] set
    /// aside (in this chain or one it went on from), if there is one, after the same wait:
    /// one read-back.
    pub fn finish_range_and_staged(
        self,
        first: usize,
        len: usize,
    ) -> Result<(Vec<f32>, Option<Array2<f32>>), GpuError> {
        self.finish_range_inner(first, len)
    }

    fn finish_range_inner(
        mut self,
        first: usize,
        len: usize,
    ) -> Result<(Vec<f32>, Option<Array2<f32>>), GpuError> {
        let ctx = self.ctx;
        let kernel = self.last_kernel;
        let total = self.bufs.width * self.bufs.height;
        if len == 0 || first.checked_add(len).is_none_or(|end| end > total) {
            return Err(GpuError::Kernel {
                kernel: kernel.into(),
                reason: format!("values {first}..+{len} of an image of {total}"),
            });
        }
        let bytes = (len * 4) as u64;
        self.encoder.copy_buffer_to_buffer(
            &self.bufs.images[self.current],
            (first * 4) as u64,
            &self.bufs.staging,
            0,
            bytes,
        );
        self.resolve_timestamps();
        if !self.params.is_empty() {
            ctx.queue.write_buffer(&self.bufs.params, 0, &self.params);
        }
        ctx.queue.submit([self.encoder.finish()]);
        commit_bank_fills(&mut self.bank_fills);
        let staged = self.staged.as_ref().map(|st| {
            (
                &st.bufs.staging,
                (st.width * st.height * 4) as u64,
                st.height,
                st.width,
            )
        });
        let mut ranges = vec![(&self.bufs.staging, bytes)];
        ranges.extend(staged.map(|(b, n, _, _)| (b, n)));
        let mut read = read_ranges(ctx, &ranges, kernel)?;
        ctx.take_error(kernel)?;
        collect_timestamps(ctx, &self.bufs, self.timed.as_deref(), kernel)?;
        for e in &self.earlier {
            collect_timestamps(ctx, &e.bufs, e.timed.as_deref(), kernel)?;
        }
        let image = match (staged, read.len()) {
            (Some((_, _, h, w)), 2) => Some(
                Array2::from_shape_vec((h, w), read.pop().unwrap_or_default()).map_err(|e| {
                    GpuError::Kernel {
                        kernel: kernel.into(),
                        reason: e.to_string(),
                    }
                })?,
            ),
            _ => None,
        };
        Ok((read.pop().unwrap_or_default(), image))
    }

    /// Submits everything queued, waits, and reads the current frame back.
    pub fn finish(self) -> Result<Array2<f32>, GpuError> {
        let (data, _) = self.finish_with_stats(false)?;
        Ok(data)
    }

    /// Like [`GpuChain::finish`], and also reads the `aux` image (e.g. the orientation that
    /// `coherence` leaves there).
    pub fn finish_with_aux(mut self) -> Result<(Array2<f32>, Array2<f32>), GpuError> {
        let bytes = (self.bufs.width * self.bufs.height * 4) as u64;
        let ctx = self.ctx;
        let kernel = self.last_kernel;
        self.encoder.copy_buffer_to_buffer(
            &self.bufs.images[self.current],
            0,
            &self.bufs.staging,
            0,
            bytes,
        );
        let bufs = self.bufs.clone();
        let aux_staging = bufs.aux_staging.get_or_init(|| {
            ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("sonoguide.aux_staging"),
                size: bytes,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        });
        self.encoder
            .copy_buffer_to_buffer(&self.bufs.aux, 0, aux_staging, 0, bytes);
        self.resolve_timestamps();
        if !self.params.is_empty() {
            ctx.queue.write_buffer(&self.bufs.params, 0, &self.params);
        }
        ctx.queue.submit([self.encoder.finish()]);
        commit_bank_fills(&mut self.bank_fills);
        // Both read-backs happen while this chain still holds its turn.
        let image = read_buffer(ctx, &self.bufs.staging, kernel)?;
        let aux = read_buffer(ctx, aux_staging, kernel)?;
        ctx.take_error(kernel)?;
        collect_timestamps(ctx, &self.bufs, self.timed.as_deref(), kernel)?;
        let shape = (self.bufs.height, self.bufs.width);
        let err = |e: ndarray::ShapeError| GpuError::Kernel {
            kernel: kernel.into(),
            reason: e.to_string(),
        };
        Ok((
            Array2::from_shape_vec(shape, image).map_err(err)?,
            Array2::from_shape_vec(shape, aux).map_err(err)?,
        ))
    }

    /// Like [`GpuChain::finish`], and also reads the `stats` buffer when `stats` is set.
    pub fn finish_with_stats(mut self, stats: bool) -> Result<(Array2<f32>, Vec<f32>), GpuError> {
        let ctx = self.ctx;
        let kernel = self.last_kernel;
        let bytes = (self.bufs.width * self.bufs.height * 4) as u64;
        self.encoder.copy_buffer_to_buffer(
            &self.bufs.images[self.current],
            0,
            &self.bufs.staging,
            0,
            bytes,
        );
        if stats {
            self.encoder.copy_buffer_to_buffer(
                &self.bufs.stats,
                0,
                &self.bufs.stats_staging,
                0,
                STATS_LEN * 4,
            );
        }
        self.resolve_timestamps();
        if !self.params.is_empty() {
            ctx.queue.write_buffer(&self.bufs.params, 0, &self.params);
        }
        ctx.queue.submit([self.encoder.finish()]);
        commit_bank_fills(&mut self.bank_fills);
        let image = read_buffer(ctx, &self.bufs.staging, kernel)?;
        let stats_out = if stats {
            read_buffer(ctx, &self.bufs.stats_staging, kernel)?
        } else {
            Vec::new()
        };
        ctx.take_error(kernel)?;
        collect_timestamps(ctx, &self.bufs, self.timed.as_deref(), kernel)?;
        let arr =
            Array2::from_shape_vec((self.bufs.height, self.bufs.width), image).map_err(|e| {
                GpuError::Kernel {
                    kernel: kernel.into(),
                    reason: e.to_string(),
                }
            })?;
        Ok((arr, stats_out))
    }
}

/// Adds a timed chain's pass times (`files`: the shader file of each pass) to the context's
/// sums, after the chain's submission has completed. Timing data, not frame data: not counted
/// as a read-back.
fn collect_timestamps(
    ctx: &GpuContext,
    bufs: &FrameBuffers,
    files: Option<&[&'static str]>,
    kernel: &str,
) -> Result<(), GpuError> {
    let (Some(files), Some(q), Some(period)) = (files, &bufs.queries, ctx.timestamp_period) else {
        return Ok(());
    };
    if files.is_empty() {
        return Ok(());
    }
    let bytes = files.len() as u64 * 16;
    let ticks: Vec<u64> = map_bytes(ctx, &q.staging, bytes, kernel, |view| {
        bytemuck::cast_slice::<u8, u64>(view).to_vec()
    })?;
    let mut sums = ctx.gpu_times.lock().unwrap_or_else(|e| e.into_inner());
    for (file, pair) in files.iter().zip(ticks.chunks_exact(2)) {
        // A pair out of order (a device that resets its counter) is left out.
        if pair[1] >= pair[0] {
            let e = sums.entry(file).or_insert((0.0, 0));
            e.0 += (pair[1] - pair[0]) as f64 * f64::from(period);
            e.1 += 1;
        }
    }
    Ok(())
}

fn read_buffer(
    ctx: &GpuContext,
    buffer: &wgpu::Buffer,
    kernel: &str,
) -> Result<Vec<f32>, GpuError> {
    read_range(ctx, buffer, buffer.size(), kernel)
}

/// Maps the first `bytes` of a staging buffer and copies them out: one read-back.
fn read_range(
    ctx: &GpuContext,
    buffer: &wgpu::Buffer,
    bytes: u64,
    kernel: &str,
) -> Result<Vec<f32>, GpuError> {
    ctx.readbacks
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    map_bytes(ctx, buffer, bytes, kernel, |view| {
        bytemuck::cast_slice::<u8, f32>(view).to_vec()
    })
}

/// After a submission: the banks it filled hold their keys.
fn commit_bank_fills(fills: &mut Vec<(Arc<FftBuffers>, u64)>) {
    for (fft, key) in fills.drain(..) {
        *fft.bank_key.lock().unwrap_or_else(|e| e.into_inner()) = Some(key);
    }
}

/// Maps the first bytes of several staging buffers (buffer, bytes), waits once for all of
/// them, and copies them out as f32: one read-back.
fn read_ranges(
    ctx: &GpuContext,
    ranges: &[(&wgpu::Buffer, u64)],
    kernel: &str,
) -> Result<Vec<Vec<f32>>, GpuError> {
    ctx.readbacks
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    map_ranges(ctx, ranges, kernel, |view| {
        bytemuck::cast_slice::<u8, f32>(view).to_vec()
    })
}

/// Maps the first `bytes` of a staging buffer, waits for it, and gives the mapped bytes to
/// `copy`.
fn map_bytes<T>(
    ctx: &GpuContext,
    buffer: &wgpu::Buffer,
    bytes: u64,
    kernel: &str,
    copy: impl FnMut(&[u8]) -> T,
) -> Result<T, GpuError> {
    let mut out = map_ranges(ctx, &[(buffer, bytes)], kernel, copy)?;
    out.pop().ok_or_else(|| GpuError::Kernel {
        kernel: kernel.into(),
        reason: "read-back returned nothing".into(),
    })
}

/// Maps the first bytes of each staging buffer (buffer, bytes), waits once (one device
/// poll) for all of them, and gives each mapped range to `copy`, in order. Every buffer that
/// was mapped is unmapped again, whatever happened to the others.
fn map_ranges<T>(
    ctx: &GpuContext,
    ranges: &[(&wgpu::Buffer, u64)],
    kernel: &str,
    mut copy: impl FnMut(&[u8]) -> T,
) -> Result<Vec<T>, GpuError> {
    let (tx, rx) = std::sync::mpsc::channel();
    for (i, (buffer, bytes)) in ranges.iter().enumerate() {
        let tx = tx.clone();
        buffer
            .slice(..*bytes)
            .map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send((i, r));
            });
    }
    drop(tx);
    let fail = |reason: String| GpuError::Kernel {
        kernel: kernel.into(),
        reason,
    };
    ctx.device
        .poll(wgpu::PollType::wait_indefinitely())
        .map_err(|e| fail(format!("device poll: {e}")))?;
    let mut failure = None;
    let mut mapped = vec![false; ranges.len()];
    for _ in ranges {
        match rx.recv() {
            Ok((i, Ok(()))) => mapped[i] = true,
            Ok((_, Err(e))) => failure = Some(format!("read-back: {e}")),
            Err(_) => failure = Some("read-back never completed".into()),
        }
    }
    let mut out = Vec::with_capacity(ranges.len());
    for (buffer, bytes) in ranges {
        if failure.is_none() {
            match buffer.slice(..*bytes).get_mapped_range() {
                Ok(view) => out.push(copy(&view)),
                Err(e) => failure = Some(format!("read-back map: {e}")),
            }
        }
    }
    for ((buffer, _), was) in ranges.iter().zip(mapped) {
        if was {
            buffer.unmap();
        }
    }
    match failure {
        Some(reason) => Err(fail(reason)),
        None => Ok(out),
    }
}
