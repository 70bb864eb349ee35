//! The planning options shared by `process` and `serve`, and `sonoguide presets`.

use std::path::PathBuf;

use sonoguide::plan::preset;

use crate::args::parse_target;
use crate::exit::{Failure, Outcome};

/// Planning options: a site preset, then any setting given explicitly on top of it.
#[derive(clap::Args, Clone)]
pub struct PlanArgs {
    /// Injection-site preset (`sonoguide presets` lists them): targets, structures to avoid
    /// with their margins, angles, needle length.
    #[arg(long)]
    preset: Option<String>,
    /// Read the presets from this TOML file instead of the built-in presets/sites.toml.
    #[arg(long)]
    presets: Option<PathBuf>,
    /// Target in mm, X_MM,Y_MM: lateral from the reference pixel, depth from the
    /// transducer face (default: chosen automatically).
    #[arg(long, value_parser = parse_target)]
    target: Option<(f64, f64)>,
    /// Smallest needle angle to the skin line, degrees [default: 15, or the preset's].
    #[arg(long)]
    min_angle: Option<f64>,
    /// Largest needle angle, degrees [default: 45, or the preset's].
    #[arg(long)]
    max_angle: Option<f64>,
    /// Clearance from bone, shadow and vessels, mm [default: 2, or the preset's].
    #[arg(long)]
    margin_mm: Option<f64>,
    /// Clearance from nerves, mm [default: 2, or the preset's].
    #[arg(long)]
    nerve_margin_mm: Option<f64>,
    /// Pixel spacing X_MM,Y_MM for frames whose file gives no usable calibration (without
    /// it such frames get no plan: status no_calibration).
    #[arg(long, value_parser = parse_spacing)]
    spacing_mm: Option<(f64, f64)>,
}

fn parse_spacing(s: &str) -> Result<(f64, f64), String> {
    let (x, y) = s
        .split_once(',')
        .ok_or_else(|| format!("'{s}' is not X_MM,Y_MM"))?;
    let num = |t: &str| {
        t.trim()
            .parse::<f64>()
            .map_err(|_| format!("bad number in '{s}'"))
    };
    let (x, y) = (num(x)?, num(y)?);
    match sonoguide::frame::check_spacing_mm(x, y) {
        Some(why) => Err(why),
        None => Ok((x, y)),
    }
}

fn presets_of(file: Option<&PathBuf>) -> Result<Vec<preset::Preset>, Failure> {
    match file {
        Some(f) => preset::load(f),
        None => preset::builtin(),
    }
    .map_err(|e| Failure::Usage(e.to_string()))
}

impl PlanArgs {
    /// Sets the pipeline's planning settings; a bad preset or value is a usage error naming it.
    pub fn apply(&self, config: &mut sonoguide::PipelineConfig) -> Result<(), Failure> {
        let p = &mut config.plan;
        if let Some(name) = &self.preset {
            let presets = presets_of(self.presets.as_ref())?;
            preset::find(&presets, name)
                .map_err(|e| Failure::Usage(e.to_string()))?
                .apply(p);
        }
        if let Some(v) = self.min_angle {
            p.min_angle_deg = v;
        }
        if let Some(v) = self.max_angle {
            p.max_angle_deg = v;
        }
        if let Some(v) = self.margin_mm {
            p.set_margins_mm(v);
        }
        if let Some(v) = self.nerve_margin_mm {
            p.nerve_margin_mm = v;
        }
        p.target_mm = self.target;
        config.spacing_mm = self.spacing_mm;
        p.validate().map_err(|e| Failure::Usage(e.to_string()))
    }
}

/// `presets`' arguments.
#[derive(clap::Args)]
pub struct PresetsArgs {
    /// Read this TOML file instead of the built-in presets.
    #[arg(long)]
    presets: Option<PathBuf>,
    /// Print the presets as JSON.
    #[arg(long)]
    json: bool,
}

/// `sonoguide presets`: lists the injection-site presets.
pub fn presets(args: PresetsArgs) -> Outcome {
    let presets = presets_of(args.presets.as_ref())?;
    if args.json {
        let text =
            serde_json::to_string_pretty(&presets).map_err(|e| Failure::Failed(e.to_string()))?;
        println!("{text}");
        return Ok(());
    }
    for p in &presets {
        let avoid: Vec<String> = p
            .avoid
            .iter()
            .map(|a| format!("{:?} {} mm", a.structure, a.margin_mm).to_lowercase())
            .collect();
        let targets: Vec<&str> = p.targets.iter().map(|t| t.as_str()).collect();
        println!(
            "{:32} {}\n{:32} targets {}; avoid {}; {}-{} deg; needle {} mm",
            p.name,
            p.title,
            "",
            targets.join(" > "),
            avoid.join(", "),
            p.angle.min,
            p.angle.max,
            p.max_needle_mm
        );
    }
    Ok(())
}
