//! `sonoguide bench`: times every kernel on a generated speckle frame (warm-up, then the
//! median of repeated runs). Speed is measured here and in `benches/`, never in tests.

use std::time::Instant;

use ndarray::Array2;
use serde::Serialize;

use super::Result;
use crate::despeckle::{Despeckler, Filter};
use crate::kernels::{frost, lee, median, obnlm, srad};
use crate::sim::phantom::{generate, Phantom, PhantomParams};

/// One timed case.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    /// Kernel name (`roundtrip` = upload and read-back alone).
    pub kernel: String,
    /// `gpu` or `cpu`.
    pub backend: String,
    /// Adapter name, or `cpu`.
    pub adapter: String,
    /// Columns.
    pub width: usize,
    /// Rows.
    pub height: usize,
    /// Named parameters.
    pub parameters: serde_json::Map<String, serde_json::Value>,
    /// Median milliseconds per frame (upload, filter and read-back on the GPU).
    pub ms_median: f64,
    /// Megapixels per second at the median.
    pub mpix_per_s: f64,
}

/// The cases timed: at least those the peers were timed on.
pub fn bench_filters() -> Result<Vec<Filter>> {
    Ok(vec![
        Filter::Srad(srad::Srad::new(0.5, 1)?),
        Filter::Srad(srad::Srad::new(0.5, 100)?),
        Filter::Obnlm(obnlm::Params::new(11, 5, 4.0)?),
        Filter::Median(median::Params::new(3)?),
        Filter::Median(median::Params::new(5)?),
        Filter::Lee(lee::Params::new(7, 0.25)?),
        Filter::Frost(frost::Params::new(7, 2.0)?),
    ])
}

/// The GPU despeckler for the criterion benches: a hardware adapter; the software one
/// (lavapipe, hundreds of times slower than a GPU) only when `SONOGUIDE_BENCH_SOFTWARE_GPU=1`.
/// `Err` says why there is no adapter to bench (the caller prints it).
#[cfg(feature = "gpu")]
pub fn bench_gpu() -> std::result::Result<Despeckler, String> {
    let d =
        Despeckler::new(crate::Backend::Gpu).map_err(|e| format!("GPU benches skipped: {e}"))?;
    let software = crate::gpu::list_adapters()
        .iter()
        .any(|a| a.name == d.device_name() && !a.hardware);
    if software
        && std::env::var("SONOGUIDE_BENCH_SOFTWARE_GPU")
            .map(|v| v != "1")
            .unwrap_or(true)
    {
        return Err(format!(
            "GPU benches skipped: only a software adapter ({})",
            d.device_name()
        ));
    }
    Ok(d)
}

/// A speckle frame of the given size from a phantom.
pub fn speckle_frame(width: usize, height: usize) -> Result<Array2<f32>> {
    Ok(bench_phantom(width, height, 1)?.frames[0].mapv(|v| v as f32))
}

/// The benches' phantom: one fixed seed, so that every bench times the same scene.
fn bench_phantom(width: usize, height: usize, frames: usize) -> Result<Phantom> {
    let mut p = PhantomParams::default().with_nominal_scanner();
    p.width = width;
    p.height = height;
    p.seed = 4242;
    p.frames = frames;
    generate("bench", &p)
}

/// Median of the values (sorted copy).
pub fn median_of(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    }
}

/// Times `f` `repeats` times after `warmup` runs; returns the median in ms.
pub fn time_ms<E: Into<super::SimError>>(
    warmup: usize,
    repeats: usize,
    mut f: impl FnMut() -> std::result::Result<(), E>,
) -> Result<f64> {
    for _ in 0..warmup {
        f().map_err(Into::into)?;
    }
    let mut t = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        let s = Instant::now();
        f().map_err(Into::into)?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median_of(&t))
}

/// Times every kernel on the despeckler's backend.
pub fn run(
    despeckler: &Despeckler,
    width: usize,
    height: usize,
    repeats: usize,
) -> Result<Vec<BenchRow>> {
    let img = speckle_frame(width, height)?;
    let mut rows = Vec::new();
    let row = |kernel: &str, parameters: Vec<(&'static str, f64)>, ms: f64| BenchRow {
        kernel: kernel.to_string(),
        backend: despeckler.backend_name().to_string(),
        adapter: despeckler.device_name(),
        width,
        height,
        parameters: parameters
            .into_iter()
            .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
            .collect(),
        ms_median: ms,
        mpix_per_s: (width * height) as f64 / 1e6 / (ms / 1e3),
    };
    if despeckler.backend_name() == "gpu" {
        let ms = time_ms(3, repeats, || despeckler.run(&img, &[]).map(|_| ()))?;
        rows.push(row("roundtrip", Vec::new(), ms));
    }
    // Feature kernels at the analysis grid of a frame of this size, and whole segmentation.
    {
        let mut p = PhantomParams::default().with_nominal_scanner();
        p.width = width;
        p.height = height;
        p.seed = 4242;
        let ph = generate("bench", &p)?;
        let frame = crate::sim::phantom::frame_of(&ph, 0)?;
        let seg = crate::segment::SegmentParams::default();
        let valid = crate::segment::valid_mask(&frame);
        let (grid, _, _, mm) =
            crate::segment::analysis_grid(&frame, &frame.intensity, &valid, &seg);
        let fp = crate::segment::feature_params(&seg, mm, grid.nrows())?;
        let (gh, gw) = grid.dim();
        let grid_row = |kernel: &str, parameters: Vec<(&'static str, f64)>, ms: f64| {
            let mut r = row(kernel, parameters, ms);
            r.width = gw;
            r.height = gh;
            r.mpix_per_s = (gw * gh) as f64 / 1e6 / (ms / 1e3);
            r
        };
        let ps_params = vec![
            ("scales", fp.0.scales as f64),
            ("orientations", fp.0.orientations as f64),
            ("min_wavelength_px", fp.0.min_wavelength as f64),
        ];
        #[cfg(feature = "gpu")]
        if let Some(ctx) = despeckler.gpu_context() {
            let gpu_ms = |encode: &dyn Fn(&mut crate::gpu::GpuChain<'_>) -> crate::Result<()>| {
                time_ms(2, repeats, || -> crate::Result<()> {
                    let mut chain = ctx.begin(&grid)?;
                    encode(&mut chain)?;
                    chain.finish()?;
                    Ok(())
                })
            };
            rows.push(grid_row(
                "phase_symmetry",
                ps_params.clone(),
                gpu_ms(&|c| crate::kernels::phase_symmetry::encode(c, &fp.0))?,
            ));
            rows.push(grid_row(
                "shadow",
                Vec::new(),
                gpu_ms(&|c| crate::kernels::shadow::encode(c, &fp.1))?,
            ));
            rows.push(grid_row(
                "coherence",
                vec![("radius", fp.2.radius as f64)],
                gpu_ms(&|c| crate::kernels::coherence::encode(c, &fp.2))?,
            ));
        }
        if despeckler.backend_name() == "cpu" {
            let plan = crate::kernels::phase_symmetry::Plan::new(&fp.0, gw, gh);
            rows.push(grid_row(
                "phase_symmetry",
                ps_params,
                time_ms(1, repeats, || plan.run(&grid).map(|_| ()))?,
            ));
            rows.push(grid_row(
                "shadow",
                Vec::new(),
                time_ms(1, repeats, || {
                    crate::kernels::shadow::cpu(&grid, &fp.1).map(|_| ())
                })?,
            ));
            rows.push(grid_row(
                "coherence",
                vec![("radius", fp.2.radius as f64)],
                time_ms(1, repeats, || {
                    crate::kernels::coherence::cpu_fast(&grid, &fp.2).map(|_| ())
                })?,
            ));
        }
        let srad = Filter::default_for("srad")?;
        let ms = time_ms(1, repeats, || {
            let des = despeckler.run(&frame.intensity, std::slice::from_ref(&srad))?;
            crate::segment::segment_with(despeckler, &frame, &des, &seg).map(|_| ())
        })?;
        rows.push(row(
            "segment",
            vec![(
                "despeckle_srad_iterations",
                crate::despeckle::defaults::SRAD_ITERATIONS as f64,
            )],
            ms,
        ));
    }
    for f in bench_filters()? {
        // The heavy CPU cases get fewer repeats: their run time dwarfs the machine's noise.
        let slow = despeckler.backend_name() == "cpu"
            && matches!(
                f,
                Filter::Obnlm(_)
                    | Filter::Srad(srad::Srad {
                        iterations: 100,
                        ..
                    })
            );
        let reps = if slow { repeats.min(5) } else { repeats };
        let ms = time_ms(1, reps, || {
            despeckler.run(&img, std::slice::from_ref(&f)).map(|_| ())
        })?;
        rows.push(row(f.name(), f.parameters(), ms));
    }
    Ok(rows)
}

/// One row of `sonoguide bench --pipeline`: whole frames through the pipeline.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineRow {
    /// `gpu` or `cpu`.
    pub backend: String,
    /// Adapter name, or `cpu`.
    pub adapter: String,
    /// Columns.
    pub width: usize,
    /// Rows.
    pub height: usize,
    /// Median per stage, ms.
    pub stages: crate::pipeline::StageTimings,
    /// Median frame time, ms (upload to plan; drawing and writing files excluded).
    pub ms_median: f64,
    /// Frames per second at the median.
    pub frames_per_s: f64,
    /// Streams: threads running frames through the one pipeline (and device) at once.
    pub streams: usize,
    /// Frames per second of all streams together, over the wall-clock time of the timed frames.
    pub throughput_frames_per_s: f64,
    /// GPU time per frame from the device's timestamps (every pass's start to end, summed),
    /// ms, over extra frames run after the timed ones (timestamps cost time of their own);
    /// `None` on the CPU path or a device without timestamps.
    pub gpu_ms_per_frame: Option<f64>,
    /// The same per shader file (`srad`, `phase_symmetry`, `pixel_mlp`, …), ms per frame.
    pub gpu_kernel_ms: std::collections::BTreeMap<String, f64>,
    /// GPU read-backs per frame (the GPU context's count over the timed frames; `None` on the
    /// CPU path).
    pub readbacks_per_frame: Option<f64>,
}

/// Most streams `run_pipeline` starts.
pub const MAX_BENCH_STREAMS: usize = 64;

/// Times whole frames through `pipeline` on a phantom of the given size: `streams` threads
/// (1 to [`MAX_BENCH_STREAMS`]) each run `repeats` frames through it at once, after one frame
/// each to warm up.
pub fn run_pipeline(
    pipeline: &crate::Pipeline,
    width: usize,
    height: usize,
    repeats: usize,
    streams: usize,
) -> Result<PipelineRow> {
    if !(1..=MAX_BENCH_STREAMS).contains(&streams) {
        return Err(super::SimError::InvalidParameter {
            name: "streams",
            reason: format!("{streams}: 1 to {MAX_BENCH_STREAMS}"),
        });
    }
    let ph = bench_phantom(width, height, 1)?;
    let frame = crate::sim::phantom::frame_of(&ph, 0)?;
    #[cfg(feature = "gpu")]
    let readbacks = || pipeline.despeckler().gpu_context().map(|c| c.readbacks());
    #[cfg(not(feature = "gpu"))]
    let readbacks = || None::<u64>;
    let run = |count: usize| -> Result<Vec<crate::pipeline::StageTimings>> {
        (0..count)
            .map(|_| Ok(pipeline.process(&frame)?.timings))
            .collect()
    };
    let in_streams = |count: usize| -> Result<Vec<crate::pipeline::StageTimings>> {
        if streams == 1 {
            return run(count);
        }
        let per: Vec<Result<Vec<_>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..streams).map(|_| scope.spawn(|| run(count))).collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        let mut all = Vec::new();
        for p in per {
            all.extend(p?);
        }
        Ok(all)
    };
    in_streams(1)?;
    let before = readbacks();
    let start = std::time::Instant::now();
    let t = in_streams(repeats.max(1))?;
    let wall_s = start.elapsed().as_secs_f64();
    let readbacks_after = readbacks();
    let (gpu_ms_per_frame, gpu_kernel_ms) = gpu_times(pipeline, || in_streams(1))?;
    let readbacks_per_frame = match (before, readbacks_after) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / t.len() as f64),
        _ => None,
    };
    let med = |f: fn(&crate::pipeline::StageTimings) -> f64| {
        median_of(&t.iter().map(f).collect::<Vec<_>>())
    };
    let stages = crate::pipeline::StageTimings {
        despeckle_ms: med(|s| s.despeckle_ms),
        features_ms: med(|s| s.features_ms),
        segment_ms: med(|s| s.segment_ms),
        plan_ms: med(|s| s.plan_ms),
        total_ms: med(|s| s.total_ms),
    };
    Ok(PipelineRow {
        backend: pipeline.despeckler().backend_name().to_string(),
        adapter: pipeline.despeckler().device_name(),
        width,
        height,
        stages,
        ms_median: stages.total_ms,
        frames_per_s: 1e3 / stages.total_ms,
        streams,
        throughput_frames_per_s: t.len() as f64 / wall_s.max(1e-9),
        gpu_ms_per_frame,
        gpu_kernel_ms,
        readbacks_per_frame,
    })
}

/// Frames run with the GPU's timestamps on, for [`PipelineRow::gpu_ms_per_frame`].
const TIMESTAMPED_FRAMES: usize = 5;

/// GPU time per frame (total, and per shader file) over [`TIMESTAMPED_FRAMES`] runs of `run`
/// (which returns the frames it ran) with the device's timestamps on.
#[cfg_attr(not(feature = "gpu"), allow(unused_variables, unused_mut))]
fn gpu_times(
    pipeline: &crate::Pipeline,
    mut run: impl FnMut() -> Result<Vec<crate::pipeline::StageTimings>>,
) -> Result<(Option<f64>, std::collections::BTreeMap<String, f64>)> {
    #[cfg(feature = "gpu")]
    if let Some(ctx) = pipeline.despeckler().gpu_context() {
        if ctx.set_timing(true) {
            ctx.take_gpu_times();
            let mut frames = 0;
            let ran = (0..TIMESTAMPED_FRAMES).try_for_each(|_| {
                frames += run()?.len();
                Ok::<_, super::SimError>(())
            });
            ctx.set_timing(false);
            ran?;
            let per: std::collections::BTreeMap<String, f64> = ctx
                .take_gpu_times()
                .into_iter()
                .map(|(k, (ms, _))| (k, ms / frames.max(1) as f64))
                .collect();
            return Ok((Some(per.values().sum()), per));
        }
    }
    Ok((None, std::collections::BTreeMap::new()))
}

/// Latency of the OpenIGTLink server: IMAGE received → results sent.
#[derive(Debug, Clone, Serialize)]
pub struct ServeRow {
    /// `gpu` or `cpu`.
    pub backend: String,
    /// Adapter name, or `cpu`.
    pub adapter: String,
    /// Columns.
    pub width: usize,
    /// Rows.
    pub height: usize,
    /// Frames sent.
    pub frames: usize,
    /// Median server latency, ms.
    pub latency_median_ms: f64,
    /// 99th percentile of the server latency, ms.
    pub latency_p99_ms: f64,
    /// Median round trip seen by the client (send, three replies back), ms.
    pub round_trip_median_ms: f64,
}

/// Runs a server on loopback around `pipeline`, sends `frames` IMAGE messages of a phantom cine
/// (sequentially, waiting for the replies), and measures the latencies.
pub fn run_serve(
    pipeline: std::sync::Arc<crate::Pipeline>,
    width: usize,
    height: usize,
    frames: usize,
) -> Result<ServeRow> {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    let ph = bench_phantom(width, height, 8)?;
    let mm_per_px = ph.truth.spacing_mm[0];
    let server = crate::igtl::Server::bind("127.0.0.1:0", pipeline.clone(), Default::default())?;
    let addr = server
        .local_addr()
        .ok_or(crate::igtl::IgtlError::NoAddress)?;
    let stop = server.stop_flag();
    let mut matrix = [0f32; 12];
    matrix[0] = mm_per_px as f32;
    matrix[4] = mm_per_px as f32;
    matrix[8] = 1.0;
    let io = |source: std::io::Error| crate::sim::SimError::Connection {
        peer: addr.to_string(),
        source,
    };
    let mut round_trips = Vec::with_capacity(frames);
    std::thread::scope(|s| -> Result<()> {
        s.spawn(|| server.run(&|_| {}));
        let result = (|| -> Result<()> {
            let mut c = std::net::TcpStream::connect(addr).map_err(io)?;
            c.set_nodelay(true).map_err(io)?;
            for k in 0..frames {
                let gray: Vec<u8> = ph.frames[k % ph.frames.len()].iter().copied().collect();
                let mut content = crate::igtl::image_content(
                    width,
                    height,
                    &[],
                    &matrix,
                    crate::igtl::CoordinateSystem::Lps,
                );
                content[2] = 1;
                content.extend_from_slice(&gray);
                let msg = crate::igtl::message("IMAGE", "bench", &content);
                let t = std::time::Instant::now();
                c.write_all(&msg).map_err(io)?;
                for _ in 0..3 {
                    let mut hb = [0u8; crate::igtl::HEADER_BYTES];
                    c.read_exact(&mut hb).map_err(io)?;
                    let h = crate::igtl::Header::parse(&hb);
                    let mut body = vec![0u8; h.body_size as usize];
                    c.read_exact(&mut body).map_err(io)?;
                }
                round_trips.push(t.elapsed().as_secs_f64() * 1e3);
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        result
    })?;
    let mut l = server.latencies_ms();
    l.sort_by(|a, b| a.total_cmp(b));
    let p99 = l
        .get(((l.len().max(1) - 1) as f64 * 0.99) as usize)
        .copied()
        .unwrap_or(f64::NAN);
    Ok(ServeRow {
        backend: pipeline.despeckler().backend_name().to_string(),
        adapter: pipeline.despeckler().device_name(),
        width,
        height,
        frames: l.len(),
        latency_median_ms: median_of(&l),
        latency_p99_ms: p99,
        round_trip_median_ms: median_of(&round_trips),
    })
}
