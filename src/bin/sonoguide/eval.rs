//! The harness commands `eval-despeckle`, `eval-segment`, `eval-plan`: scores on phantoms from
//! fresh seeds, as Markdown tables or JSON.

use sonoguide::sim::{eval, phantom};
use sonoguide::Filter;

use crate::args::{open_despeckler, BackendOpt, GeometryArg, FILTER_CHOICES};
use crate::exit::{print_json, Outcome};

/// `eval-despeckle`'s arguments.
#[derive(clap::Args)]
pub struct EvalDespeckleArgs {
    /// Number of phantoms.
    #[arg(long, default_value_t = 10)]
    count: u64,
    /// First seed.
    #[arg(long, default_value_t = 10_000)]
    seed: u64,
    #[command(flatten)]
    backend: BackendOpt,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `eval-segment`'s arguments.
#[derive(clap::Args)]
pub struct EvalSegmentArgs {
    /// Number of phantoms.
    #[arg(long, default_value_t = 20)]
    count: u64,
    /// First seed.
    #[arg(long, default_value_t = 30_000)]
    seed: u64,
    /// Despeckling filter before segmentation.
    #[arg(long, default_value = "srad", value_parser = FILTER_CHOICES)]
    despeckle: String,
    /// Probe geometry of the phantoms.
    #[arg(long, value_enum, default_value_t = GeometryArg::Linear)]
    geometry: GeometryArg,
    #[command(flatten)]
    backend: BackendOpt,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `eval-plan`'s arguments.
#[derive(clap::Args)]
pub struct EvalPlanArgs {
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
    #[command(flatten)]
    backend: BackendOpt,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `sonoguide eval-despeckle`.
pub fn eval_despeckle(args: EvalDespeckleArgs) -> Outcome {
    let EvalDespeckleArgs {
        count,
        seed,
        backend,
        json,
    } = args;
    let d = open_despeckler(backend.get())?;
    let filters = sonoguide::despeckle::FILTER_NAMES
        .iter()
        .map(|n| Filter::default_for(n))
        .collect::<sonoguide::Result<Vec<Filter>>>()?;
    let scores = eval::despeckle_scores(
        &d,
        &filters,
        seed..seed + count,
        &phantom::PhantomParams::default(),
    )?;
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
        "{count} phantoms, seeds {seed}..{}, on {}",
        seed + count,
        d.device_name()
    );
    Ok(())
}

/// `sonoguide eval-segment`.
pub fn eval_segment(args: EvalSegmentArgs) -> Outcome {
    let EvalSegmentArgs {
        count,
        seed,
        despeckle,
        geometry,
        backend,
        json,
    } = args;
    let d = open_despeckler(backend.get())?;
    let mut params = phantom::PhantomParams::default();
    params.geometry = geometry.into();
    let filter = Filter::default_for(&despeckle)?;
    let s = eval::segment_scores(
        &d,
        &filter,
        &sonoguide::segment::SegmentParams::default(),
        seed..seed + count,
        &params,
    )?;
    if json {
        return print_json(&s);
    }
    let names = ["tendon", "bone band", "shadow", "joint/effusion", "vessel"];
    println!("| measure | value | cases |");
    println!("|---|---|---|");
    for (i, n) in names.iter().enumerate() {
        println!("| Dice {n} | {:.3} | {} |", s.dice[i], s.dice_cases[i]);
    }
    let rows = [
        (
            "bone surface distance, mean (truth → found)",
            s.bone_mean_mm,
            "mm",
        ),
        (
            "bone surface distance, 95th percentile",
            s.bone_p95_mm,
            "mm",
        ),
        ("found → truth distance, mean", s.bone_false_mean_mm, "mm"),
    ];
    for (name, v, unit) in rows {
        println!("| {name} | {v:.3} {unit} | |");
    }
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
        "{} phantoms ({count} seeds from {seed}), despeckled with {despeckle}, on {}",
        s.cases,
        d.device_name()
    );
    Ok(())
}

/// `sonoguide eval-plan`.
pub fn eval_plan(args: EvalPlanArgs) -> Outcome {
    let EvalPlanArgs {
        count,
        seed,
        cines,
        cine_frames,
        backend,
        json,
    } = args;
    let mut config = sonoguide::PipelineConfig::default();
    config.backend = backend.get();
    let pipeline = sonoguide::Pipeline::new(config)?;
    let s = eval::plan_scores(
        &pipeline,
        seed..seed + count,
        seed + count..seed + count + cines,
        cine_frames,
        &phantom::PhantomParams::default(),
    )?;
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
    Ok(())
}
