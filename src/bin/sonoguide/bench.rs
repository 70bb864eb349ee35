//! `sonoguide bench`: kernel, whole-pipeline and OpenIGTLink timings as tables or JSON.

use sonoguide::sim::bench as harness;

use crate::args::{open_despeckler, parse_size, BackendOpt};
use crate::exit::{print_json, Outcome};

/// Frame size of the kernel and serve benches when `--size` is not given.
const DEFAULT_SIZE: (usize, usize) = (1024, 768);
/// Frame sizes of the pipeline bench when `--size` is not given.
const PIPELINE_SIZES: [(usize, usize); 2] = [(640, 480), (1024, 768)];

/// `bench`'s arguments.
#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    backend: BackendOpt,
    /// Frame size, WIDTHxHEIGHT (kernels and --serve: default 1024x768; --pipeline: default
    /// both 640x480 and 1024x768).
    #[arg(long, value_parser = parse_size)]
    size: Option<(usize, usize)>,
    /// Timed runs per case (after warm-up).
    #[arg(long, default_value_t = 15)]
    repeats: usize,
    /// Print a JSON array.
    #[arg(long)]
    json: bool,
    /// Time whole frames through the pipeline, per stage, instead.
    #[arg(long, conflicts_with = "serve")]
    pipeline: bool,
    /// With --pipeline: threads running frames through the one pipeline (and GPU device) at
    /// once; the table adds their frames per second together.
    #[arg(long, default_value_t = 1, requires = "pipeline")]
    streams: usize,
    /// Measure the OpenIGTLink server's latency (IMAGE received → results sent) over
    /// --repeats frames instead.
    #[arg(long)]
    serve: bool,
}

/// `sonoguide bench`.
pub fn bench(args: BenchArgs) -> Outcome {
    if args.pipeline {
        pipeline(&args)
    } else if args.serve {
        serve(&args)
    } else {
        kernels(&args)
    }
}

fn kernels(args: &BenchArgs) -> Outcome {
    let (w, h) = args.size.unwrap_or(DEFAULT_SIZE);
    let d = open_despeckler(args.backend.get())?;
    let rows = harness::run(&d, w, h, args.repeats)?;
    if args.json {
        return print_json(&rows);
    }
    println!(
        "{:<10} {:<8} {:<28} {:>6} {:>6} {:<36} {:>10} {:>10}",
        "kernel", "backend", "adapter", "width", "height", "parameters", "ms_median", "mpix_per_s"
    );
    for r in &rows {
        let params: Vec<String> = r
            .parameters
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!(
            "{:<10} {:<8} {:<28} {:>6} {:>6} {:<36} {:>10.3} {:>10.1}",
            r.kernel,
            r.backend,
            r.adapter,
            r.width,
            r.height,
            params.join(","),
            r.ms_median,
            r.mpix_per_s
        );
    }
    Ok(())
}

fn pipeline(args: &BenchArgs) -> Outcome {
    let mut config = sonoguide::PipelineConfig::default();
    config.backend = args.backend.get();
    let pipeline = sonoguide::Pipeline::new(config)?;
    let sizes: Vec<(usize, usize)> = match args.size {
        Some(s) => vec![s],
        None => PIPELINE_SIZES.to_vec(),
    };
    let mut rows = Vec::new();
    for (w, h) in sizes {
        rows.push(harness::run_pipeline(
            &pipeline,
            w,
            h,
            args.repeats,
            args.streams,
        )?);
    }
    if args.json {
        return print_json(&rows);
    }
    println!(
        "{:<8} {:<28} {:>6} {:>6} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9} {:>10} {:>8} {:>9} {:>8}",
        "backend",
        "adapter",
        "width",
        "height",
        "despeckle",
        "features",
        "segment",
        "plan",
        "ms_median",
        "frames/s",
        "readbacks",
        "streams",
        "all_fps",
        "gpu_ms"
    );
    for r in &rows {
        let s = r.stages;
        println!(
            "{:<8} {:<28} {:>6} {:>6} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>9.1} {:>10} {:>8} {:>9.1} {:>8}",
            r.backend,
            r.adapter,
            r.width,
            r.height,
            s.despeckle_ms,
            s.features_ms,
            s.segment_ms,
            s.plan_ms,
            r.ms_median,
            r.frames_per_s,
            r.readbacks_per_frame
                .map_or_else(|| "-".to_string(), |n| format!("{n:.1}")),
            r.streams,
            r.throughput_frames_per_s,
            r.gpu_ms_per_frame
                .map_or_else(|| "-".to_string(), |ms| format!("{ms:.2}"))
        );
    }
    Ok(())
}

fn serve(args: &BenchArgs) -> Outcome {
    let (w, h) = args.size.unwrap_or(DEFAULT_SIZE);
    let pipeline = std::sync::Arc::new(
        sonoguide::Pipeline::builder()
            .backend(args.backend.get())
            .build()?,
    );
    let row = harness::run_serve(pipeline, w, h, args.repeats)?;
    if args.json {
        return print_json(&[row]);
    }
    println!(
        "{} on {}: {} frames of {}x{}; latency (IMAGE received → results sent) median {:.2} ms, 99th percentile {:.2} ms; client round trip median {:.2} ms",
        row.backend, row.adapter, row.frames, row.width, row.height, row.latency_median_ms, row.latency_p99_ms, row.round_trip_median_ms
    );
    Ok(())
}
