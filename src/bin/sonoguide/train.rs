//! `sonoguide train-pixels`: trains the pixel classifier on folders of simulated cases (read
//! through the DICOM reader) and writes the model JSON that `models/pixel_mlp.json` holds.

use std::path::PathBuf;

use sonoguide::sim::train::{self, TrainOptions};

use crate::args::{BackendOpt, FILTER_CHOICES};
use crate::exit::{Failure, Outcome};

/// `train-pixels`' arguments.
#[derive(clap::Args)]
pub struct TrainArgs {
    /// Folders of tuning cases (`NAME.dcm`, `NAME.truth.png`, `NAME.truth.json`). Never a
    /// test set.
    #[arg(required = true)]
    dirs: Vec<PathBuf>,
    /// Where to write the model JSON.
    #[arg(long)]
    out: PathBuf,
    /// Seed of sampling, initial weights and batch order.
    #[arg(long, default_value_t = 2026)]
    seed: u64,
    /// Passes over the samples.
    #[arg(long, default_value_t = 12)]
    epochs: usize,
    /// Hidden layer widths, comma-separated.
    #[arg(long, default_value = "32,16")]
    hidden: String,
    /// Frames sampled per cine.
    #[arg(long, default_value_t = 2)]
    frames_per_case: usize,
    /// Despeckling filter before the features (as in `process`).
    #[arg(long, default_value = "srad", value_parser = FILTER_CHOICES)]
    despeckle: String,
    /// Train the second stage (auto-context) over this first-stage model's probabilities
    /// (e.g. models/pixel_mlp.json); without it, the first stage is trained.
    #[arg(long)]
    first_stage: Option<PathBuf>,
    #[command(flatten)]
    backend: BackendOpt,
}

/// `sonoguide train-pixels`.
pub fn train_pixels(args: TrainArgs) -> Outcome {
    let mut opt = TrainOptions::default();
    opt.seed = args.seed;
    opt.epochs = args.epochs;
    opt.frames_per_case = args.frames_per_case;
    opt.hidden = args
        .hidden
        .split(',')
        .map(|w| w.trim().parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Failure::Usage(format!("--hidden {}: {e}", args.hidden)))?;
    if opt
        .hidden
        .iter()
        .any(|&w| w == 0 || w > sonoguide::segment::pixels::MAX_WIDTH)
    {
        return Err(Failure::Usage(format!(
            "--hidden {}: widths must be 1..={}",
            args.hidden,
            sonoguide::segment::pixels::MAX_WIDTH
        )));
    }
    if let Some(path) = &args.first_stage {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Failure::Usage(format!("--first-stage {}: {e}", path.display())))?;
        let model = sonoguide::segment::pixels::PixelModel::from_json(
            &text,
            &sonoguide::segment::pixels::FEATURE_NAMES,
            &sonoguide::segment::pixels::class_names(),
        )
        .map_err(|e| Failure::Usage(format!("--first-stage {}: {e}", path.display())))?;
        opt.first_stage = Some(model);
    }
    let mut config = sonoguide::PipelineConfig::default();
    config.backend = args.backend.get();
    config.filters = vec![sonoguide::Filter::default_for(&args.despeckle)?];
    let pipeline = sonoguide::Pipeline::new(config)?;
    let samples = train::collect(&pipeline, &args.dirs, &opt)?;
    eprintln!(
        "{} frames, {} samples; training {} epochs",
        samples.frames,
        samples.y.len(),
        opt.epochs
    );
    let (mut model, report) = train::train(&samples, &opt);
    model.provenance = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "seed": opt.seed,
        "hidden": opt.hidden,
        "epochs": opt.epochs,
        "despeckle": args.despeckle,
        "sets": args.dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>(),
        "report": report,
    });
    let text = serde_json::to_string(&model).map_err(|e| Failure::Failed(e.to_string()))?;
    // Written beside the target and renamed, so an interrupted run leaves no partial model.
    let tmp = args.out.with_extension("json.tmp");
    std::fs::write(&tmp, &text)
        .and_then(|()| std::fs::rename(&tmp, &args.out))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Failure::Failed(format!("cannot write {}: {e}", args.out.display()))
        })?;
    println!(
        "{}",
        serde_json::to_string_pretty(&report).unwrap_or_default()
    );
    Ok(())
}
