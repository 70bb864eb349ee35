//! `sonoguide eval-set`: scores segmentation and planning on folders of cases on disk (DICOM
//! plus truth files), each file read through the DICOM reader as a user's would be.

use std::path::PathBuf;

use sonoguide::plan::preset;
use sonoguide::sim::evalset::{self, SetScore};

use crate::args::{BackendOpt, SegmenterOpt, FILTER_CHOICES};
use crate::exit::{print_json, Failure, Outcome};

/// `eval-set`'s arguments.
#[derive(clap::Args)]
pub struct EvalSetArgs {
    /// Folders of cases (`NAME.dcm`, `NAME.truth.png`, `NAME.truth.json`).
    #[arg(required = true)]
    dirs: Vec<PathBuf>,
    /// Despeckling filter before segmentation.
    #[arg(long, default_value = "srad", value_parser = FILTER_CHOICES)]
    despeckle: String,
    #[command(flatten)]
    backend: BackendOpt,
    #[command(flatten)]
    segmenter: SegmenterOpt,
    /// Print JSON (with every frame's scores).
    #[arg(long)]
    json: bool,
    /// Also print one line per frame.
    #[arg(long)]
    cases: bool,
    /// Plan with this injection-site preset (`sonoguide presets`).
    #[arg(long, conflicts_with = "by_preset")]
    preset: Option<String>,
    /// Each folder is named after a preset (tests/data/pusim/presets/NAME): plan each with its
    /// preset and print one row per preset.
    #[arg(long)]
    by_preset: bool,
}

fn pipeline_for(args: &EvalSetArgs, preset: Option<&str>) -> Result<sonoguide::Pipeline, Failure> {
    let mut config = sonoguide::PipelineConfig::default();
    config.backend = args.backend.get();
    config.filters = vec![sonoguide::Filter::default_for(&args.despeckle)?];
    config.segment = args.segmenter.params();
    if let Some(name) = preset {
        let presets = preset::builtin().map_err(|e| Failure::Usage(e.to_string()))?;
        preset::find(&presets, name)
            .map_err(|e| Failure::Usage(e.to_string()))?
            .apply(&mut config.plan);
    }
    Ok(sonoguide::Pipeline::new(config)?)
}

/// One row per preset: scenes, targets found (of a kind the preset looks for), paths planned,
/// honest refusals, unsafe paths by the truth, and the refusal reasons.
fn by_preset(args: &EvalSetArgs) -> Outcome {
    println!(
        "| preset | scenes | target found | planned | refused (no safe path) | unsafe | \
         target within tol | target err mm | refusal reasons |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for dir in &args.dirs {
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| Failure::Usage(format!("{}: not a preset folder", dir.display())))?;
        let pipeline = pipeline_for(args, Some(name))?;
        let kinds = &pipeline.config().plan.targets;
        let sets = evalset::score_dir(&pipeline, dir)?;
        let cases: Vec<_> = sets.iter().flat_map(|s| &s.cases).collect();
        let found = cases
            .iter()
            .filter(|c| {
                c.target_kind
                    .as_deref()
                    .is_some_and(|k| kinds.iter().any(|t| t.as_str() == k))
            })
            .count();
        let planned = cases.iter().filter(|c| c.status == "ok").count();
        let refused: Vec<&str> = cases
            .iter()
            .filter(|c| c.status != "ok")
            .filter_map(|c| c.reason.as_deref())
            .collect();
        let s = sets
            .first()
            .ok_or_else(|| Failure::Usage(format!("{}: no cases", dir.display())))?;
        let mut reasons: Vec<String> = refused
            .iter()
            .map(|r| r.split(" (").next().unwrap_or(r).to_string())
            .collect();
        reasons.sort();
        reasons.dedup();
        println!(
            "| {name} | {} | {found} | {planned} | {} | {} | {}/{} | {} | {} |",
            cases.len(),
            refused.len(),
            s.unsafe_paths,
            s.target_within,
            s.target_frames,
            f(s.target_error_mean_mm),
            reasons.join("; ")
        );
    }
    Ok(())
}

fn f(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else {
        format!("{v:.2}")
    }
}

/// `sonoguide eval-set`.
pub fn eval_set(args: EvalSetArgs) -> Outcome {
    if args.by_preset {
        return by_preset(&args);
    }
    let pipeline = pipeline_for(&args, args.preset.as_deref())?;
    let mut all: Vec<SetScore> = Vec::new();
    for dir in &args.dirs {
        all.extend(evalset::score_dir(&pipeline, dir)?);
    }
    if args.json {
        return print_json(&all);
    }
    println!(
        "| set | frames | Dice tendon | bone | shadow | joint | vessel | nerve | bone dist mm | \
         missed bone | false bone | target within tol | target err mm | paths | unsafe | no safe path | \
         convex entry err max mm |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for s in &all {
        let d: Vec<String> = s.dice.iter().map(|v| f(*v)).collect();
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {}/{} | {}/{} | {} | {} | {} | {} | {} |",
            s.set,
            s.frames,
            d[0],
            d[1],
            d[2],
            d[3],
            d[4],
            d[5],
            f(s.bone_mean_mm),
            s.missed_bone_frames,
            s.false_bone_frames,
            s.no_bone_frames,
            s.target_within,
            s.target_frames,
            f(s.target_error_mean_mm),
            s.with_path,
            s.unsafe_paths,
            s.no_safe_path,
            f(s.entry_arc_error_max_mm),
        );
    }
    if args.cases {
        for s in &all {
            for c in &s.cases {
                let d: Vec<String> = c.dice.iter().map(|v| f(v.unwrap_or(f64::NAN))).collect();
                println!(
                    "{} {} [{}] bone {} tgt {} ({} vs {}) {} {} crossed {:?}",
                    s.set,
                    c.name,
                    d.join(" "),
                    f(c.bone_mean_mm.unwrap_or(f64::NAN)),
                    f(c.target_error_mm.unwrap_or(f64::NAN)),
                    c.target_kind.as_deref().unwrap_or("-"),
                    c.truth_target_kind.as_deref().unwrap_or("-"),
                    c.status,
                    c.reason.as_deref().unwrap_or(""),
                    c.crossed
                );
            }
        }
    }
    eprintln!(
        "{} set(s) through the DICOM reader, despeckled with {}, on {}",
        all.len(),
        args.despeckle,
        pipeline.despeckler().device_name()
    );
    Ok(())
}
