//! The `sonoguide` command line: parses arguments, calls the library, prints, and maps the
//! outcome to an exit code (0 all good, 1 some inputs failed, 2 usage error).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod batch;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

use sonoguide::dicom::{DicomFile, ReadOptions};
use sonoguide::phantom::{self, Geometry, PhantomParams};
use sonoguide::{Backend, Despeckler, Filter};

/// Exit code when some inputs failed (the others were processed).
pub(crate) const EXIT_INPUT_FAILED: u8 = 1;
/// Exit code for a usage error (bad arguments, unwritable output folder).
pub(crate) const EXIT_USAGE: u8 = 2;

#[derive(Parser)]
#[command(
    name = "sonoguide",
    version,
    about = "Ultrasound-guidance image pipeline (research tool, not a medical device)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print what a DICOM file holds: format, size, frames, ultrasound regions, calibration.
    Info {
        /// DICOM files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Print a JSON array, one object per file.
        #[arg(long)]
        json: bool,
    },
    /// Write every frame of a DICOM file as frame_NNNN.png.
    Frames {
        /// DICOM file.
        file: PathBuf,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Write the B-mode intensity (greyscale) instead of the displayed RGB.
        #[arg(long)]
        gray: bool,
    },
    /// List the GPU adapters wgpu sees.
    Adapters {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Despeckle every frame of DICOM files; writes OUT/<stem>/frame_NNNN.png (greyscale).
    Despeckle {
        /// DICOM files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        filter: FilterArgs,
        /// Where the kernels run.
        #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
        backend: BackendArg,
    },
    /// Segment every frame: OUT/<stem>/frame_NNNN.labels.png (values 0-5),
    /// frame_NNNN.labels_preview.png (colour overlay with legend) and frame_NNNN.bone.json.
    Segment {
        /// DICOM files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Despeckling filter applied first (defaults as in `despeckle`).
        #[arg(long, default_value = "srad", value_parser = ["srad", "obnlm", "lee", "frost", "median"])]
        despeckle: String,
        /// Where the kernels run.
        #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
        backend: BackendArg,
    },
    /// The main job: despeckle, segment and plan every frame of DICOM files (or folders);
    /// write overlays, labels, bone and plan JSON per frame, a derived overlay DICOM per file,
    /// and OUT/summary.json.
    Process {
        /// DICOM files or folders.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Look into sub-folders of folder inputs.
        #[arg(long)]
        recursive: bool,
        /// Files processed at once.
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// Where the kernels run.
        #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
        backend: BackendArg,
        /// Frames to process: N, A..B (B excluded) or A-B (B included); zero-based.
        #[arg(long, value_parser = parse_frames)]
        frames: Option<(usize, usize)>,
        /// Skip inputs whose overlay DICOM already exists in OUT (resume a batch).
        #[arg(long)]
        skip_existing: bool,
        /// Draw the overlay on the despeckled or the original frame.
        #[arg(long, value_enum, default_value_t = OverlayOn::Despeckled)]
        overlay_on: OverlayOn,
        /// Target in mm, X_MM,Y_MM: lateral from the reference pixel, depth from the
        /// transducer face (default: chosen automatically).
        #[arg(long, value_parser = parse_target)]
        target: Option<(f64, f64)>,
        /// Smallest needle angle to the skin line, degrees.
        #[arg(long, default_value_t = 15.0)]
        min_angle: f64,
        /// Largest needle angle, degrees.
        #[arg(long, default_value_t = 45.0)]
        max_angle: f64,
        /// Clearance from bone, shadow and vessels, mm.
        #[arg(long, default_value_t = 2.0)]
        margin_mm: f64,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Serve OpenIGTLink: answer each IMAGE with an overlay IMAGE, a POINT (entry, target) and a
    /// STRING (the plan as JSON). Stops cleanly on SIGINT or SIGTERM.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        bind: String,
        /// Port (OpenIGTLink's is 18944; 0 picks a free one).
        #[arg(long, default_value_t = 18944)]
        port: u16,
        /// Where the kernels run.
        #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
        backend: BackendArg,
    },
    /// Time every kernel on a generated speckle frame (median of repeated runs).
    Bench {
        /// Where the kernels run.
        #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
        backend: BackendArg,
        /// Frame size, WIDTHxHEIGHT.
        #[arg(long, default_value = "1024x768", value_parser = parse_size)]
        size: (usize, usize),
        /// Timed runs per case (after warm-up).
        #[arg(long, default_value_t = 15)]
        repeats: usize,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
        /// Time whole frames through the pipeline (per stage) at 640x480 and 1024x768 instead.
        #[arg(long)]
        pipeline: bool,
        /// Measure the OpenIGTLink server's latency (IMAGE received → results sent) over
        /// --repeats frames at --size instead.
        #[arg(long)]
        serve: bool,
    },
    /// Score despeckling on phantoms from fresh seeds against their clean maps.
    EvalDespeckle {
        /// Number of phantoms.
        #[arg(long, default_value_t = 10)]
        count: u64,
        /// First seed.
        #[arg(long, default_value_t = 10_000)]
        seed: u64,
        /// Where the kernels run.
        #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
        backend: BackendArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Score segmentation on phantoms from fresh seeds against their truth.
    EvalSegment {
        /// Number of phantoms.
        #[arg(long, default_value_t = 20)]
        count: u64,
        /// First seed.
        #[arg(long, default_value_t = 30_000)]
        seed: u64,
        /// Despeckling filter before segmentation.
        #[arg(long, default_value = "srad", value_parser = ["srad", "obnlm", "lee", "frost", "median"])]
        despeckle: String,
        /// Probe geometry of the phantoms.
        #[arg(long, value_enum, default_value_t = GeometryArg::Linear)]
        geometry: GeometryArg,
        /// Where the kernels run.
        #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
        backend: BackendArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Score needle planning on phantoms from fresh seeds: target error, path safety by the
    /// truth labels, and frame-to-frame jitter on moving cines.
    EvalPlan {
        /// Number of single-frame phantoms.
        #[arg(long, default_value_t = 20)]
        count: u64,
        /// First seed.
        #[arg(long, default_value_t = 60_000)]
        seed: u64,
        /// Number of moving cines for the jitter.
        #[arg(long, default_value_t = 3)]
        cines: u64,
        /// Frames per cine.
        #[arg(long, default_value_t = 20)]
        cine_frames: usize,
        /// Where the kernels run.
        #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
        backend: BackendArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Generate synthetic MSK phantoms (DICOM + truth labels + clean map + truth JSON).
    Phantom {
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Number of cases.
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Seed of the first case (case i uses seed + i).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Frames per case (more than 1: a cine with the probe sliding sideways).
        #[arg(long, default_value_t = 1)]
        frames: usize,
        /// Probe geometry.
        #[arg(long, value_enum, default_value_t = GeometryArg::Linear)]
        geometry: GeometryArg,
        /// Image size, WIDTHxHEIGHT.
        #[arg(long, default_value = "480x360", value_parser = parse_size)]
        size: (usize, usize),
        /// Millimetres per pixel.
        #[arg(long, default_value_t = 0.08)]
        mm_per_px: f64,
        /// Case name prefix.
        #[arg(long, default_value = "phantom")]
        prefix: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendArg {
    Auto,
    Gpu,
    Cpu,
}

impl From<BackendArg> for Backend {
    fn from(b: BackendArg) -> Backend {
        match b {
            BackendArg::Auto => Backend::Auto,
            BackendArg::Gpu => Backend::Gpu,
            BackendArg::Cpu => Backend::Cpu,
        }
    }
}

/// Filter choice and options shared by the commands that despeckle.
#[derive(clap::Args, Clone)]
struct FilterArgs {
    /// Speckle filter.
    #[arg(long, default_value = "srad", value_parser = ["srad", "obnlm", "lee", "frost", "median"])]
    filter: String,
    /// SRAD: iterations.
    #[arg(long)]
    iterations: Option<u32>,
    /// SRAD: time step (0..1].
    #[arg(long)]
    lambda: Option<f32>,
    /// OBNLM: search window (odd).
    #[arg(long)]
    search: Option<u32>,
    /// OBNLM: patch (odd).
    #[arg(long)]
    patch: Option<u32>,
    /// OBNLM: smoothing h.
    #[arg(long)]
    h: Option<f32>,
    /// Lee, Frost: window (odd).
    #[arg(long)]
    window: Option<u32>,
    /// Lee: speckle coefficient of variation.
    #[arg(long)]
    noise_cv: Option<f32>,
    /// Frost: damping.
    #[arg(long)]
    damping: Option<f32>,
    /// Median: size (3 or 5).
    #[arg(long = "median-size")]
    median_size: Option<u32>,
}

impl FilterArgs {
    fn filter(&self) -> sonoguide::Result<Filter> {
        use sonoguide::despeckle::defaults as d;
        use sonoguide::kernels::{frost, lee, median, obnlm, srad};
        Ok(match self.filter.as_str() {
            "srad" => Filter::Srad(srad::Srad::new(
                self.lambda.unwrap_or(d::SRAD_LAMBDA),
                self.iterations.unwrap_or(d::SRAD_ITERATIONS),
            )?),
            "obnlm" => Filter::Obnlm(obnlm::Params::new(
                self.search.unwrap_or(d::OBNLM_SEARCH),
                self.patch.unwrap_or(d::OBNLM_PATCH),
                self.h.unwrap_or(d::OBNLM_H),
            )?),
            "lee" => Filter::Lee(lee::Params::new(
                self.window.unwrap_or(d::LEE_WINDOW),
                self.noise_cv.unwrap_or(d::LEE_NOISE_CV),
            )?),
            "frost" => Filter::Frost(frost::Params::new(
                self.window.unwrap_or(d::FROST_WINDOW),
                self.damping.unwrap_or(d::FROST_DAMPING),
            )?),
            "median" => Filter::Median(median::Params::new(
                self.median_size.unwrap_or(d::MEDIAN_SIZE),
            )?),
            other => Filter::default_for(other)?,
        })
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum OverlayOn {
    Despeckled,
    Original,
}

fn parse_frames(s: &str) -> Result<(usize, usize), String> {
    let num = |t: &str| {
        t.trim()
            .parse::<usize>()
            .map_err(|_| format!("'{t}' is not a frame number"))
    };
    if let Some((a, b)) = s.split_once("..") {
        let (a, b) = (num(a)?, num(b)?);
        return if b > a {
            Ok((a, b))
        } else {
            Err(format!("empty range '{s}'"))
        };
    }
    if let Some((a, b)) = s.split_once('-') {
        let (a, b) = (num(a)?, num(b)?);
        return if b >= a {
            Ok((a, b + 1))
        } else {
            Err(format!("empty range '{s}'"))
        };
    }
    let n = num(s)?;
    Ok((n, n + 1))
}

fn parse_target(s: &str) -> Result<(f64, f64), String> {
    let (x, y) = s
        .split_once(',')
        .ok_or_else(|| format!("'{s}' is not X_MM,Y_MM"))?;
    let x: f64 = x.trim().parse().map_err(|_| format!("bad X in '{s}'"))?;
    let y: f64 = y.trim().parse().map_err(|_| format!("bad Y in '{s}'"))?;
    if !x.is_finite() || !y.is_finite() || y < 0.0 {
        return Err(format!("'{s}': the depth must be a finite number ≥ 0"));
    }
    Ok((x, y))
}

#[derive(Clone, Copy, ValueEnum)]
enum GeometryArg {
    Linear,
    Curved,
}

fn parse_size(s: &str) -> Result<(usize, usize), String> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("'{s}' is not WIDTHxHEIGHT"))?;
    let w = w
        .trim()
        .parse()
        .map_err(|_| format!("bad width in '{s}'"))?;
    let h = h
        .trim()
        .parse()
        .map_err(|_| format!("bad height in '{s}'"))?;
    Ok((w, h))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Info { files, json } => info(&files, json),
        Command::Adapters { json } => adapters(json),
        Command::Despeckle {
            files,
            out,
            filter,
            backend,
        } => despeckle(&files, &out, &filter, backend.into()),
        Command::Segment {
            files,
            out,
            despeckle,
            backend,
        } => segment(&files, &out, &despeckle, backend.into()),
        Command::Process {
            inputs,
            out,
            recursive,
            jobs,
            backend,
            frames,
            skip_existing,
            overlay_on,
            target,
            min_angle,
            max_angle,
            margin_mm,
            filter,
        } => {
            let filter = match filter.filter() {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            if !((0.0..90.0).contains(&min_angle)
                && (min_angle..90.0).contains(&max_angle)
                && (0.0..50.0).contains(&margin_mm))
            {
                eprintln!(
                    "error: need 0 ≤ --min-angle ≤ --max-angle < 90 and 0 ≤ --margin-mm < 50"
                );
                return ExitCode::from(EXIT_USAGE);
            }
            let mut config = sonoguide::PipelineConfig::default();
            config.backend = backend.into();
            config.filters = vec![filter];
            config.plan.min_angle_deg = min_angle;
            config.plan.max_angle_deg = max_angle;
            config.plan.margin_mm = margin_mm;
            config.plan.target_mm = target;
            let opts = batch::Options {
                recursive,
                jobs: jobs.max(1),
                frames,
                skip_existing,
                overlay_on_original: overlay_on == OverlayOn::Original,
            };
            batch::run(&inputs, &out, config, &opts)
        }
        Command::EvalPlan {
            count,
            seed,
            cines,
            cine_frames,
            backend,
            json,
        } => eval_plan(count, seed, cines, cine_frames, backend.into(), json),
        Command::Serve {
            bind,
            port,
            backend,
        } => serve(&bind, port, backend.into()),
        Command::Bench {
            backend,
            repeats,
            json,
            pipeline: true,
            ..
        } => bench_pipeline(backend.into(), repeats, json),
        Command::Bench {
            backend,
            repeats,
            json,
            size,
            serve: true,
            ..
        } => bench_serve(backend.into(), size, repeats, json),
        Command::Bench {
            backend,
            size,
            repeats,
            json,
            ..
        } => bench(backend.into(), size, repeats, json),
        Command::EvalDespeckle {
            count,
            seed,
            backend,
            json,
        } => eval_despeckle(count, seed, backend.into(), json),
        Command::EvalSegment {
            count,
            seed,
            despeckle,
            geometry,
            backend,
            json,
        } => eval_segment(count, seed, &despeckle, geometry, backend.into(), json),
        Command::Frames { file, out, gray } => frames(&file, &out, gray),
        Command::Phantom {
            out,
            count,
            seed,
            frames,
            geometry,
            size,
            mm_per_px,
            prefix,
        } => {
            let geometry = match geometry {
                GeometryArg::Linear => Geometry::Linear,
                GeometryArg::Curved => Geometry::Curved,
            };
            let mut params = PhantomParams::default();
            params.width = size.0;
            params.height = size.1;
            params.mm_per_px = mm_per_px;
            params.frames = frames;
            params.geometry = geometry;
            phantoms(&out, count, seed, &prefix, params)
        }
    }
}

fn make_out_dir(out: &Path) -> Result<(), ExitCode> {
    std::fs::create_dir_all(out).map_err(|e| {
        eprintln!("error: cannot create output folder {}: {e}", out.display());
        ExitCode::from(EXIT_USAGE)
    })
}

fn info_json(path: &Path) -> Value {
    let file = match DicomFile::open(path, &ReadOptions::default()) {
        Ok(f) => f,
        Err(e) => return json!({"path": path, "error": e.to_string()}),
    };
    let i = file.info();
    let region = match file.imaging_region_info() {
        Ok(r) => json!({
            "x0": r.bounds.x0, "y0": r.bounds.y0, "x1": r.bounds.x1, "y1": r.bounds.y1,
            "shape": r.shape, "source": r.source,
            "mm_per_px_x": r.mm_per_px_x, "mm_per_px_y": r.mm_per_px_y,
            "reference_pixel_x0": r.reference_pixel_x0, "reference_pixel_y0": r.reference_pixel_y0,
        }),
        Err(e) => return json!({"path": path, "error": e.to_string()}),
    };
    let calibration_reason = match &i.calibration {
        sonoguide::Calibration::Unusable { reason } => Some(reason.clone()),
        _ => None,
    };
    json!({
        "path": path,
        "sop_class_uid": i.sop_class_uid,
        "transfer_syntax_uid": i.transfer_syntax_uid,
        "photometric_interpretation": i.photometric_interpretation,
        "rows": i.rows,
        "columns": i.columns,
        "frames": i.frames,
        "bits_allocated": i.bits_allocated,
        "bits_stored": i.bits_stored,
        "samples_per_pixel": i.samples_per_pixel,
        "planar_configuration": i.planar_configuration,
        "ultrasound_regions": i.ultrasound_regions,
        "imaging_region": region,
        "calibration": i.calibration.status(),
        "calibration_reason": calibration_reason,
    })
}

fn info(files: &[PathBuf], as_json: bool) -> ExitCode {
    let reports: Vec<Value> = files.iter().map(|p| info_json(p)).collect();
    let failed = reports.iter().filter(|r| r.get("error").is_some()).count();
    if as_json {
        match serde_json::to_string_pretty(&reports) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_INPUT_FAILED);
            }
        }
    } else {
        for r in &reports {
            print_info_text(r);
        }
    }
    for r in reports.iter().filter(|r| r.get("error").is_some()) {
        eprintln!("error: {}", r["error"].as_str().unwrap_or("unknown"));
    }
    if failed > 0 {
        ExitCode::from(EXIT_INPUT_FAILED)
    } else {
        ExitCode::SUCCESS
    }
}

fn print_info_text(r: &Value) {
    let s = |k: &str| {
        r.get(k)
            .map(|v| v.to_string().trim_matches('"').to_string())
            .unwrap_or_default()
    };
    println!("{}", s("path"));
    if r.get("error").is_some() {
        println!("  error: {}", s("error"));
        return;
    }
    println!("  SOP class            {}", s("sop_class_uid"));
    println!("  transfer syntax      {}", s("transfer_syntax_uid"));
    println!("  photometric          {}", s("photometric_interpretation"));
    println!(
        "  size                 {} x {} px, {} frame(s)",
        s("columns"),
        s("rows"),
        s("frames")
    );
    println!(
        "  bits allocated       {} ({} stored), {} sample(s) per pixel",
        s("bits_allocated"),
        s("bits_stored"),
        s("samples_per_pixel")
    );
    if let Some(regions) = r["ultrasound_regions"].as_array() {
        for (k, g) in regions.iter().enumerate() {
            println!(
                "  region {k}             ({},{})-({},{}) format {} type {} units {}/{} delta {}/{} ref ({},{}) mm/px {}/{}",
                g["min_x0"], g["min_y0"], g["max_x1"], g["max_y1"], g["spatial_format"], g["data_type"],
                g["units_x"], g["units_y"], g["physical_delta_x"], g["physical_delta_y"],
                g["reference_pixel_x0"], g["reference_pixel_y0"], g["mm_per_px_x"], g["mm_per_px_y"]
            );
        }
    }
    let ir = &r["imaging_region"];
    println!(
        "  imaging region       ({},{})-({},{}) {} from {}, mm/px {} x {}",
        ir["x0"],
        ir["y0"],
        ir["x1"],
        ir["y1"],
        ir["shape"],
        ir["source"],
        ir["mm_per_px_x"],
        ir["mm_per_px_y"]
    );
    match r["calibration_reason"].as_str() {
        Some(reason) => println!("  calibration          {} ({reason})", s("calibration")),
        None => println!("  calibration          {}", s("calibration")),
    }
}

fn frames(file: &Path, out: &Path, gray: bool) -> ExitCode {
    let dicom = match DicomFile::open(file, &ReadOptions::default()) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_INPUT_FAILED);
        }
    };
    if let Err(code) = make_out_dir(out) {
        return code;
    }
    let (w, h) = (dicom.info().columns as usize, dicom.info().rows as usize);
    let mut failed = 0;
    for i in 0..dicom.frame_count() {
        let path = out.join(format!("frame_{i:04}.png"));
        let result = dicom
            .decode_display(i)
            .map_err(sonoguide::Error::from)
            .and_then(|(rgb, intensity)| {
                if gray {
                    let g = intensity.mapv(|v| v.round().clamp(0.0, 255.0) as u8);
                    sonoguide::imageio::write_gray_png(&path, &g)
                } else {
                    let buf: Vec<u8> = match rgb {
                        Some(rgb) => rgb.iter().copied().collect(),
                        None => intensity
                            .iter()
                            .flat_map(|v| [v.round().clamp(0.0, 255.0) as u8; 3])
                            .collect(),
                    };
                    sonoguide::imageio::write_rgb_png(&path, w, h, &buf)
                }
            });
        if let Err(e) = result {
            eprintln!("error: {e}");
            failed += 1;
        }
    }
    eprintln!(
        "{}: wrote {} of {} frame(s) to {}",
        file.display(),
        dicom.frame_count() - failed,
        dicom.frame_count(),
        out.display()
    );
    if failed > 0 {
        ExitCode::from(EXIT_INPUT_FAILED)
    } else {
        ExitCode::SUCCESS
    }
}

fn phantoms(out: &Path, count: usize, seed: u64, prefix: &str, params: PhantomParams) -> ExitCode {
    if let Err(code) = make_out_dir(out) {
        return code;
    }
    let mut failed = 0;
    for i in 0..count {
        let mut p = params.clone();
        p.seed = seed + i as u64;
        let name = format!("{prefix}_{:04}", p.seed);
        match phantom::write_case(out, &name, &p) {
            Ok(truth) => eprintln!(
                "{}: {} scene, target {}, {} frame(s)",
                out.join(format!("{name}.dcm")).display(),
                truth.scene,
                truth.target_kind,
                truth.frames.len()
            ),
            Err(e) => {
                eprintln!("error: {name}: {e}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        ExitCode::from(EXIT_INPUT_FAILED)
    } else {
        ExitCode::SUCCESS
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> ExitCode {
    match serde_json::to_string_pretty(v) {
        Ok(s) => {
            println!("{s}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_INPUT_FAILED)
        }
    }
}

fn open_despeckler(backend: Backend) -> Result<Despeckler, ExitCode> {
    match Despeckler::new(backend) {
        Ok(d) => {
            if let Some(note) = d.note() {
                eprintln!("note: {note}");
            }
            Ok(d)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Err(ExitCode::from(EXIT_INPUT_FAILED))
        }
    }
}

fn adapters(json: bool) -> ExitCode {
    let list = sonoguide::gpu::list_adapters();
    if json {
        return print_json(&list);
    }
    if list.is_empty() {
        println!("no GPU adapters (the CPU backend will be used)");
    }
    for a in &list {
        println!(
            "{} [{} {}] driver {}; max storage binding {} MiB{}",
            a.name,
            a.backend,
            a.device_type,
            a.driver,
            a.max_storage_buffer_binding_size >> 20,
            if a.hardware {
                ""
            } else {
                " (software: used only with --backend gpu)"
            }
        );
    }
    ExitCode::SUCCESS
}

fn despeckle(files: &[PathBuf], out: &Path, args: &FilterArgs, backend: Backend) -> ExitCode {
    let filter = match args.filter() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let d = match open_despeckler(backend) {
        Ok(d) => d,
        Err(c) => return c,
    };
    if let Err(code) = make_out_dir(out) {
        return code;
    }
    let mut failures = Vec::new();
    for file in files {
        let result = (|| -> sonoguide::Result<usize> {
            let dicom = DicomFile::open(file, &ReadOptions::default())?;
            let stem = file
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "input".into());
            let dir = out.join(stem);
            std::fs::create_dir_all(&dir).map_err(|source| sonoguide::Error::Write {
                path: dir.clone(),
                source,
            })?;
            for frame in dicom.frames() {
                let frame = frame?;
                let filtered = d.run(&frame.intensity, std::slice::from_ref(&filter))?;
                let g = filtered.mapv(|v| v.round().clamp(0.0, 255.0) as u8);
                sonoguide::imageio::write_gray_png(
                    &dir.join(format!("frame_{:04}.png", frame.index)),
                    &g,
                )?;
            }
            Ok(dicom.frame_count())
        })();
        match result {
            Ok(n) => eprintln!(
                "{}: {n} frame(s) despeckled with {} on {}",
                file.display(),
                filter.name(),
                d.device_name()
            ),
            Err(e) => {
                eprintln!("error: {e}");
                failures.push(e.to_string());
            }
        }
    }
    report_failures(&failures, files.len())
}

fn bench(backend: Backend, size: (usize, usize), repeats: usize, json: bool) -> ExitCode {
    let d = match open_despeckler(backend) {
        Ok(d) => d,
        Err(c) => return c,
    };
    let rows = match sonoguide::bench::run(&d, size.0, size.1, repeats) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_INPUT_FAILED);
        }
    };
    if json {
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
    ExitCode::SUCCESS
}

fn eval_despeckle(count: u64, seed: u64, backend: Backend, json: bool) -> ExitCode {
    let d = match open_despeckler(backend) {
        Ok(d) => d,
        Err(c) => return c,
    };
    let filters: Vec<Filter> = match sonoguide::despeckle::FILTER_NAMES
        .iter()
        .map(|n| Filter::default_for(n))
        .collect()
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_INPUT_FAILED);
        }
    };
    let scores = match sonoguide::eval::despeckle_scores(
        &d,
        &filters,
        seed..seed + count,
        &sonoguide::phantom::PhantomParams::default(),
    ) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_INPUT_FAILED);
        }
    };
    if json {
        return print_json(&scores);
    }
    println!("| filter | parameters | SSIM | PSNR dB | ENL | CNR tendon | bone edge ratio |");
    println!("|---|---|---|---|---|---|---|");
    for s in &scores {
        let params: Vec<String> = s
            .parameters
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!(
            "| {} | {} | {:.3} | {:.2} | {:.1} | {:.2} | {:.2} |",
            s.filter,
            params.join(", "),
            s.ssim,
            s.psnr_db,
            s.enl,
            s.cnr_tendon,
            s.bone_edge_ratio
        );
    }
    eprintln!(
        "{} phantoms, seeds {seed}..{}, on {}",
        count,
        seed + count,
        d.device_name()
    );
    ExitCode::SUCCESS
}

fn eval_segment(
    count: u64,
    seed: u64,
    despeckle: &str,
    geometry: GeometryArg,
    backend: Backend,
    json: bool,
) -> ExitCode {
    let d = match open_despeckler(backend) {
        Ok(d) => d,
        Err(c) => return c,
    };
    let mut params = sonoguide::phantom::PhantomParams::default();
    params.geometry = match geometry {
        GeometryArg::Linear => Geometry::Linear,
        GeometryArg::Curved => Geometry::Curved,
    };
    let result = Filter::default_for(despeckle).and_then(|f| {
        sonoguide::eval::segment_scores(
            &d,
            &f,
            &sonoguide::segment::SegmentParams::default(),
            seed..seed + count,
            &params,
        )
    });
    let s = match result {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_INPUT_FAILED);
        }
    };
    if json {
        return print_json(&s);
    }
    let names = ["tendon", "bone band", "shadow", "joint/effusion", "vessel"];
    println!("| measure | value | cases |");
    println!("|---|---|---|");
    for (i, n) in names.iter().enumerate() {
        println!("| Dice {n} | {:.3} | {} |", s.dice[i], s.dice_cases[i]);
    }
    println!(
        "| bone surface distance, mean (truth → found) | {:.3} mm | |",
        s.bone_mean_mm
    );
    println!(
        "| bone surface distance, 95th percentile | {:.3} mm | |",
        s.bone_p95_mm
    );
    println!(
        "| found → truth distance, mean | {:.3} mm | |",
        s.bone_false_mean_mm
    );
    println!(
        "| truth bone points missed (> 2 mm) | {:.1} % | |",
        100.0 * s.bone_missed_share
    );
    println!(
        "| frames without bone where bone was labelled | {} of {} | |",
        s.false_bone_frames, s.no_bone_frames
    );
    println!(
        "| despeckle + segment, median per frame | {:.1} ms | |",
        s.ms_median
    );
    eprintln!(
        "{} phantoms ({} seeds from {seed}), despeckled with {despeckle}, on {}",
        s.cases,
        count,
        d.device_name()
    );
    ExitCode::SUCCESS
}

fn segment(files: &[PathBuf], out: &Path, despeckle: &str, backend: Backend) -> ExitCode {
    let filter = match Filter::default_for(despeckle) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let d = match open_despeckler(backend) {
        Ok(d) => d,
        Err(c) => return c,
    };
    if let Err(code) = make_out_dir(out) {
        return code;
    }
    let params = sonoguide::segment::SegmentParams::default();
    let mut failures = Vec::new();
    for file in files {
        let result = (|| -> sonoguide::Result<(usize, usize)> {
            let dicom = DicomFile::open(file, &ReadOptions::default())?;
            let stem = file
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "input".into());
            let dir = out.join(stem);
            std::fs::create_dir_all(&dir).map_err(|source| sonoguide::Error::Write {
                path: dir.clone(),
                source,
            })?;
            let mut with_bone = 0;
            for frame in dicom.frames() {
                let frame = frame?;
                let despeckled = d.run(&frame.intensity, std::slice::from_ref(&filter))?;
                let seg = sonoguide::segment::segment_with(&d, &frame, &despeckled, &params)?;
                let name = format!("frame_{:04}", frame.index);
                sonoguide::imageio::write_gray_png(
                    &dir.join(format!("{name}.labels.png")),
                    &seg.labels,
                )?;
                let preview = sonoguide::overlay::label_preview(&despeckled, &seg.labels)?;
                sonoguide::imageio::write_rgb_png(
                    &dir.join(format!("{name}.labels_preview.png")),
                    preview.width() as usize,
                    preview.height() as usize,
                    preview.as_raw(),
                )?;
                sonoguide::imageio::write_json(
                    &dir.join(format!("{name}.bone.json")),
                    &seg.bone_json(),
                )?;
                if !seg.bone_polylines_px.is_empty() {
                    with_bone += 1;
                }
            }
            Ok((dicom.frame_count(), with_bone))
        })();
        match result {
            Ok((n, b)) => eprintln!(
                "{}: {n} frame(s) segmented, bone found in {b}",
                file.display()
            ),
            Err(e) => {
                eprintln!("error: {e}");
                failures.push(e.to_string());
            }
        }
    }
    report_failures(&failures, files.len())
}

fn report_failures(failures: &[String], total: usize) -> ExitCode {
    if failures.is_empty() {
        return ExitCode::SUCCESS;
    }
    eprintln!("{} of {total} file(s) failed:", failures.len());
    for f in failures {
        eprintln!("  {f}");
    }
    ExitCode::from(EXIT_INPUT_FAILED)
}

fn eval_plan(
    count: u64,
    seed: u64,
    cines: u64,
    cine_frames: usize,
    backend: Backend,
    json: bool,
) -> ExitCode {
    let mut config = sonoguide::PipelineConfig::default();
    config.backend = backend;
    let pipeline = match sonoguide::Pipeline::new(config) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_INPUT_FAILED);
        }
    };
    let cine_seeds = seed + count..seed + count + cines;
    let s = match sonoguide::eval::plan_scores(
        &pipeline,
        seed..seed + count,
        cine_seeds,
        cine_frames,
        &sonoguide::phantom::PhantomParams::default(),
    ) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_INPUT_FAILED);
        }
    };
    if json {
        return print_json(&s);
    }
    println!("| measure | value |");
    println!("|---|---|");
    println!("| phantoms | {} |", s.cases);
    println!("| frames with a safe path | {} |", s.with_path);
    println!(
        "| paths crossing bone, shadow or vessel (truth) | {} |",
        s.unsafe_paths
    );
    println!(
        "| smallest truth clearance along a path | {:.2} mm |",
        s.min_truth_clearance_mm
    );
    println!(
        "| target kind as in the truth | {} of {} |",
        s.kind_matches, s.cases
    );
    println!("| target error, mean | {:.2} mm |", s.target_error_mean_mm);
    println!(
        "| target error, 95th percentile | {:.2} mm |",
        s.target_error_p95_mm
    );
    println!(
        "| cine target jitter, raw → smoothed | {:.3} → {:.3} mm/frame |",
        s.target_jitter_raw_mm, s.target_jitter_smoothed_mm
    );
    println!(
        "| cine entry jitter, raw → smoothed | {:.3} → {:.3} mm/frame |",
        s.entry_jitter_raw_mm, s.entry_jitter_smoothed_mm
    );
    println!(
        "| cine frame pairs measured / target kind switches | {} / {} |",
        s.jitter_pairs, s.kind_switches
    );
    eprintln!(
        "seeds {seed}..{} and {cines} cine(s) of {cine_frames} frames, on {}",
        seed + count,
        pipeline.despeckler().device_name()
    );
    ExitCode::SUCCESS
}

fn bench_pipeline(backend: Backend, repeats: usize, json: bool) -> ExitCode {
    let mut config = sonoguide::PipelineConfig::default();
    config.backend = backend;
    let pipeline = match sonoguide::Pipeline::new(config) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_INPUT_FAILED);
        }
    };
    let mut rows = Vec::new();
    for (w, h) in [(640, 480), (1024, 768)] {
        match sonoguide::bench::run_pipeline(&pipeline, w, h, repeats) {
            Ok(r) => rows.push(r),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_INPUT_FAILED);
            }
        }
    }
    if json {
        return print_json(&rows);
    }
    println!(
        "{:<8} {:<28} {:>6} {:>6} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9}",
        "backend",
        "adapter",
        "width",
        "height",
        "despeckle",
        "features",
        "segment",
        "plan",
        "ms_median",
        "frames/s"
    );
    for r in &rows {
        let s = r.stages;
        println!(
            "{:<8} {:<28} {:>6} {:>6} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>9.1}",
            r.backend,
            r.adapter,
            r.width,
            r.height,
            s.despeckle_ms,
            s.features_ms,
            s.segment_ms,
            s.plan_ms,
            r.ms_median,
            r.frames_per_s
        );
    }
    ExitCode::SUCCESS
}

fn serve(bind: &str, port: u16, backend: Backend) -> ExitCode {
    let mut config = sonoguide::PipelineConfig::default();
    config.backend = backend;
    let pipeline = match sonoguide::Pipeline::new(config) {
        Ok(p) => std::sync::Arc::new(p),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_INPUT_FAILED);
        }
    };
    let server = match sonoguide::igtl::Server::bind(
        &format!("{bind}:{port}"),
        pipeline.clone(),
        Default::default(),
    ) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot listen on {bind}:{port}: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let stop = server.stop_flag();
    if let Err(e) =
        ctrlc::set_handler(move || stop.store(true, std::sync::atomic::Ordering::Relaxed))
    {
        eprintln!("warning: no signal handler ({e}); stop with SIGKILL");
    }
    eprintln!(
        "sonoguide serve on {} ({}); research tool, not a medical device",
        pipeline.despeckler().device_name(),
        pipeline.despeckler().backend_name()
    );
    server.run(&|event| match event {
        sonoguide::igtl::Event::Listening(a) => eprintln!("listening on {a}"),
        sonoguide::igtl::Event::Connected(a) => eprintln!("{a}: connected"),
        sonoguide::igtl::Event::Disconnected(a) => eprintln!("{a}: disconnected"),
        sonoguide::igtl::Event::Answered {
            peer, latency_ms, ..
        } => eprintln!("{peer}: answered in {latency_ms:.1} ms"),
        sonoguide::igtl::Event::Refused { peer, reason } => eprintln!("{peer}: closed: {reason}"),
        sonoguide::igtl::Event::Ignored { peer, kind } => {
            eprintln!("{peer}: ignored a {kind} message")
        }
        _ => {}
    });
    let mut l = server.latencies_ms();
    if !l.is_empty() {
        l.sort_by(|a, b| a.total_cmp(b));
        eprintln!(
            "stopped: {} frame(s), latency median {:.1} ms, 99th percentile {:.1} ms",
            l.len(),
            l[l.len() / 2],
            l[((l.len() - 1) as f64 * 0.99) as usize]
        );
    } else {
        eprintln!("stopped");
    }
    ExitCode::SUCCESS
}

fn bench_serve(backend: Backend, size: (usize, usize), frames: usize, json: bool) -> ExitCode {
    let pipeline = match sonoguide::Pipeline::builder().backend(backend).build() {
        Ok(p) => std::sync::Arc::new(p),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_INPUT_FAILED);
        }
    };
    let row = match sonoguide::bench::run_serve(pipeline, size.0, size.1, frames) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_INPUT_FAILED);
        }
    };
    if json {
        return print_json(&[row]);
    }
    println!(
        "{} on {}: {} frames of {}x{}; latency (IMAGE received → results sent) median {:.2} ms, 99th percentile {:.2} ms; client round trip median {:.2} ms",
        row.backend, row.adapter, row.frames, row.width, row.height, row.latency_median_ms, row.latency_p99_ms, row.round_trip_median_ms
    );
    ExitCode::SUCCESS
}
