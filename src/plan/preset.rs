//! Injection-site presets: what the planner aims for at a site and what it keeps clear of, read
//! from a TOML file people can read and edit (`presets/sites.toml` is built in; its comments
//! cite the source of every number).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{PlanError, PlanParams, Side, TargetKind};

/// The built-in presets, as shipped in `presets/sites.toml`.
const BUILTIN: &str = include_str!("../../presets/sites.toml");

/// Longest final approach a preset may exempt from the bone margin, mm: the needle tip
/// between two bone ends, not a licence to run along bone.
pub const MAX_FINAL_APPROACH_MM: f64 = 5.0;

/// The probe a preset expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Probe {
    /// A linear array.
    Linear,
    /// A curvilinear (convex) array.
    Convex,
}

/// The preferred side of entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SidePreference {
    /// From the left of the image.
    Left,
    /// From the right of the image.
    Right,
    /// No preference.
    Either,
}

/// A structure a preset keeps clear of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Structure {
    /// Bone surface.
    Bone,
    /// Acoustic shadow.
    Shadow,
    /// Vessel (B-mode or colour Doppler).
    Vessel,
    /// Nerve.
    Nerve,
}

/// One structure to avoid, with its margin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Avoid {
    /// The structure.
    pub structure: Structure,
    /// Distance to keep, mm.
    pub margin_mm: f64,
    /// Which structure of the site it stands for (shown to people).
    #[serde(default)]
    pub note: Option<String>,
}

/// Needle angle limits, degrees to the skin.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Angles {
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
    /// Preferred.
    pub preferred: f64,
}

/// One injection site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    /// Short name, chosen with `--preset`.
    pub name: String,
    /// Shown to people.
    pub title: String,
    /// Expected probe.
    pub probe: Probe,
    /// Expected imaging depth [min, max], mm.
    pub depth_mm: [f64; 2],
    /// Target kinds in order of priority.
    pub targets: Vec<TargetKind>,
    /// Final approach exempt from the bone and shadow margins (joint-space targets only), mm.
    pub final_approach_mm: f64,
    /// Angle limits.
    pub angle: Angles,
    /// Longest path, mm.
    pub max_needle_mm: f64,
    /// Preferred side of entry.
    pub side: SidePreference,
    /// Structures and margins.
    pub avoid: Vec<Avoid>,
    /// Keys of the sources cited in the file's header.
    #[serde(default)]
    pub sources: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PresetFile {
    preset: Vec<Preset>,
}

/// Errors reading presets.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PresetError {
    /// The file could not be read.
    #[error("cannot read presets {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a valid preset file.
    #[error("presets {path}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// No preset of that name.
    #[error("no preset named {name:?} (known: {known})")]
    Unknown {
        /// The name asked for.
        name: String,
        /// The names there are.
        known: String,
    },
}

/// Largest preset file read, bytes (the built-in one is a few kB).
const MAX_FILE_BYTES: u64 = 1 << 20;

/// Parses presets from TOML text; `origin` names the source in errors. Every preset is
/// checked (the settings it gives must pass [`PlanParams::validate`]) and names are unique.
pub fn parse(text: &str, origin: &str) -> Result<Vec<Preset>, PresetError> {
    let invalid = |reason: String| PresetError::Invalid {
        path: origin.to_string(),
        reason,
    };
    let file: PresetFile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
    let mut names = std::collections::BTreeSet::new();
    for p in &file.preset {
        if !names.insert(p.name.as_str()) {
            return Err(invalid(format!("preset {:?} is defined twice", p.name)));
        }
        p.params()
            .validate()
            .map_err(|e| invalid(format!("preset {:?}: {e}", p.name)))?;
        let [lo, hi] = p.depth_mm;
        if !(lo.is_finite() && hi.is_finite() && 0.0 <= lo && lo <= hi) {
            return Err(invalid(format!(
                "preset {:?}: depth_mm [{lo}, {hi}] is not a range of depths",
                p.name
            )));
        }
    }
    Ok(file.preset)
}

/// The built-in presets.
pub fn builtin() -> Result<Vec<Preset>, PresetError> {
    parse(BUILTIN, "presets/sites.toml (built in)")
}

/// Reads presets from a file (at most 1 MiB).
pub fn load(path: &Path) -> Result<Vec<Preset>, PresetError> {
    let shown = path.display().to_string();
    let io = |source| PresetError::Io {
        path: shown.clone(),
        source,
    };
    let f = std::fs::File::open(path).map_err(io)?;
    let mut text = String::new();
    use std::io::Read;
    f.take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(io)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(PresetError::Invalid {
            path: shown,
            reason: format!("larger than {MAX_FILE_BYTES} bytes"),
        });
    }
    parse(&text, &shown)
}

/// The preset called `name` among `presets`.
pub fn find<'a>(presets: &'a [Preset], name: &str) -> Result<&'a Preset, PresetError> {
    presets
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| PresetError::Unknown {
            name: name.to_string(),
            known: presets
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

impl Preset {
    /// The planner's settings for this site (the defaults for what it does not set).
    pub fn params(&self) -> PlanParams {
        let mut p = PlanParams::default();
        self.apply(&mut p);
        p
    }

    /// Sets `params` for this site; a user target and the spacing are left as they are.
    pub fn apply(&self, p: &mut PlanParams) {
        p.min_angle_deg = self.angle.min;
        p.max_angle_deg = self.angle.max;
        p.preferred_angle_deg = self.angle.preferred;
        p.targets = self.targets.clone();
        p.final_approach_mm = self.final_approach_mm;
        p.max_length_mm = Some(self.max_needle_mm);
        p.preferred_side = match self.side {
            SidePreference::Left => Some(Side::Left),
            SidePreference::Right => Some(Side::Right),
            SidePreference::Either => None,
        };
        for a in &self.avoid {
            match a.structure {
                Structure::Bone => p.margin_mm = a.margin_mm,
                Structure::Shadow => p.shadow_margin_mm = a.margin_mm,
                Structure::Vessel => p.vessel_margin_mm = a.margin_mm,
                Structure::Nerve => p.nerve_margin_mm = a.margin_mm,
            }
        }
        p.preset = Some(self.name.clone());
        p.expected_depth_mm = Some(self.depth_mm);
    }
}

impl From<PresetError> for PlanError {
    fn from(e: PresetError) -> PlanError {
        PlanError::InvalidParameter {
            name: "preset",
            reason: e.to_string(),
        }
    }
}
