//! The `sonoguide` command line: parses arguments and hands each command to its module; the
//! exit code follows from the outcome (0 all good, 1 some inputs failed, 2 usage error; see
//! `exit.rs`). Only the command line prints.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod args;
mod batch;
mod bench;
mod eval;
mod evalset;
mod exit;
mod inspect;
mod phantom;
mod plan_args;
mod remote;
mod serve;
mod train;

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
    Info(inspect::InfoArgs),
    /// Write every frame of a DICOM file as frame_NNNN.png.
    Frames(inspect::FramesArgs),
    /// List the GPU adapters wgpu sees.
    Adapters(inspect::AdaptersArgs),
    /// Despeckle every frame of DICOM files; writes OUT/<stem>/frame_NNNN.png (greyscale).
    Despeckle(batch::DespeckleArgs),
    /// Segment every frame: OUT/<stem>/frame_NNNN.labels.png (values 0-6),
    /// frame_NNNN.labels_preview.png (colour overlay with legend) and frame_NNNN.bone.json.
    Segment(batch::SegmentArgs),
    /// The main job: despeckle, segment and plan every frame of DICOM files (or folders);
    /// write overlays, labels, bone and plan JSON per frame, a derived overlay DICOM per file,
    /// and OUT/summary.json.
    Process(batch::ProcessArgs),
    /// Poll a DICOMweb server for new ultrasound instances and process each once (resumable:
    /// OUT/watch-state.json remembers what was done); --store sends the results back.
    Watch(remote::WatchArgs),
    /// Serve OpenIGTLink: answer each IMAGE with an overlay IMAGE, a POINT (entry, target) and a
    /// STRING (the plan as JSON). Stops cleanly on SIGINT or SIGTERM.
    Serve(serve::ServeArgs),
    /// Time every kernel on a generated speckle frame (median of repeated runs).
    Bench(bench::BenchArgs),
    /// Score despeckling on phantoms from fresh seeds against their clean maps.
    EvalDespeckle(eval::EvalDespeckleArgs),
    /// Score segmentation on phantoms from fresh seeds against their truth.
    EvalSegment(eval::EvalSegmentArgs),
    /// Score needle planning on phantoms from fresh seeds: target error, path safety by the
    /// truth labels, and frame-to-frame jitter on moving cines.
    EvalPlan(eval::EvalPlanArgs),
    /// Score segmentation and planning on folders of cases on disk (NAME.dcm with
    /// NAME.truth.png and NAME.truth.json), read through the DICOM reader.
    EvalSet(evalset::EvalSetArgs),
    /// Generate synthetic MSK phantoms (DICOM + truth labels + clean map + truth JSON).
    Phantom(phantom::PhantomArgs),
    /// List the injection-site presets (`--preset NAME` of process and serve).
    Presets(plan_args::PresetsArgs),
    /// Train the pixel classifier on folders of tuning cases; writes the model JSON.
    TrainPixels(train::TrainArgs),
}

fn main() -> ExitCode {
    let outcome = match Cli::parse().command {
        Command::Info(a) => inspect::info(a),
        Command::Frames(a) => inspect::frames(a),
        Command::Adapters(a) => inspect::adapters(a),
        Command::Despeckle(a) => batch::despeckle(a),
        Command::Segment(a) => batch::segment(a),
        Command::Process(a) => batch::process(a),
        Command::Watch(a) => remote::watch(a),
        Command::Serve(a) => serve::serve(a),
        Command::Bench(a) => bench::bench(a),
        Command::EvalDespeckle(a) => eval::eval_despeckle(a),
        Command::EvalSegment(a) => eval::eval_segment(a),
        Command::EvalPlan(a) => eval::eval_plan(a),
        Command::EvalSet(a) => evalset::eval_set(a),
        Command::Phantom(a) => phantom::phantom(a),
        Command::Presets(a) => plan_args::presets(a),
        Command::TrainPixels(a) => train::train_pixels(a),
    };
    exit::exit_code(outcome)
}
