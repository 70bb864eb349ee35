//! In-plane needle path planning: a straight needle from a skin entry point to a target, kept
//! clear of bone, acoustic shadow, vessels, nerves and tendons.
//!
//! - Target: given in mm, or chosen by the kinds of [`PlanParams::targets`] in order of
//!   priority (a site preset sets them; see [`preset`]): the centre of a joint space (label 4
//!   between two bone ends), the middle of an effusion or bursa 1 mm above its
//!   floor, just superficial to a tendon (peritendinous), inside it (intratendinous), or beside
//!   a nerve outside its margin (perineural); tendons and nerves are taken where the image is
//!   centred (the sonographer centres the structure to be injected).
//! - Entry: every column of the skin line (the near arc of a fan) on either side of the target
//!   is tried; the search is exhaustive, not sampled.
//! - Constraints: the angle between needle and skin line within [min, max] (one definition,
//!   [`needle_angle`], for the planner and the cine smoother); the path inside the imaging
//!   region and no longer than the needle; each structure kept at its margin, judged exactly by
//!   [`path::Obstacles::check`] (the one path check). A tendon may be pierced only to reach an
//!   intratendinous target; otherwise it must not be crossed. Only a joint-space target has a
//!   final approach, bounded by [`preset::MAX_FINAL_APPROACH_MM`] and reported, where bone and
//!   shadow need only not be crossed (the target lies between bone ends by nature).
//! - Cost: length / 40 mm + |angle − preferred| / 15° + 1 mm / clearance (+ 1 for the side a
//!   preset does not prefer).
//!
//! A frame without a usable calibration gets `no_calibration` and no plan in mm, unless the
//! caller gives the spacing (which the plan then reports as its calibration's source); a frame
//! with no target or no safe entry gets `no_safe_path` with the reason.

pub mod edt;
pub mod path;
pub mod preset;
mod target;

use serde::{Deserialize, Serialize};

pub use edt::distance_mm;
use path::{Obstacles, PathCheck, Rule};

use crate::frame::{CalibrationSource, Frame};
use crate::label::Label;
use crate::segment::Segmentation;

/// Added to the nerve margin the planner keeps, mm. A nerve's outline is the least certain of
/// the classifier's (its held-out nerve recall, 0.75, is its lowest; see `models/README.md`),
/// and a labelled nerve can lie inside the true one by a fraction of a millimetre; a path
/// judged against the labelled outline would then come closer to the nerve than its margin.
/// Half a millimetre is about one resolution cell of a 10 MHz linear probe (axial ~0.3 mm,
/// lateral ~0.5 mm). The plan's `margins_mm.nerve` stays the margin asked for; its notes say
/// when the allowance was kept too. Not applied to the evaluation's truth check, which uses the
/// margin asked for.
pub const NERVE_OUTLINE_ALLOWANCE_MM: f64 = 0.5;

/// Settings of the planner.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PlanParams {
    /// Smallest angle between needle and skin line, degrees.
    pub min_angle_deg: f64,
    /// Largest angle, degrees (steeper needles fade from view).
    pub max_angle_deg: f64,
    /// Preferred angle, degrees.
    pub preferred_angle_deg: f64,
    /// Clearance from bone, mm.
    pub margin_mm: f64,
    /// Clearance from acoustic shadow, mm.
    pub shadow_margin_mm: f64,
    /// Clearance from vessels (B-mode and colour Doppler), mm.
    pub vessel_margin_mm: f64,
    /// Clearance from nerves, mm.
    pub nerve_margin_mm: f64,
    /// Target kinds, in order of priority, for the automatic choice.
    pub targets: Vec<TargetKind>,
    /// The final approach to a joint-space target where bone and shadow need only not be
    /// crossed, mm (0 ..= [`preset::MAX_FINAL_APPROACH_MM`]).
    pub final_approach_mm: f64,
    /// Longest path (the needle's usable length), mm; none: no limit.
    pub max_length_mm: Option<f64>,
    /// The side of entry a preset prefers.
    pub preferred_side: Option<Side>,
    /// A target given by the user: (lateral mm, depth mm) from the reference pixel and the
    /// transducer face.
    pub target_mm: Option<(f64, f64)>,
    /// The site preset these settings came from (reported in the plan).
    pub preset: Option<String>,
    /// The imaging depth the preset expects, mm; a frame outside it gets a note.
    pub expected_depth_mm: Option<[f64; 2]>,
}

/// Errors of the planner's settings.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// A setting is not a number, infinite or out of its range.
    #[error("invalid planning parameter {name}: {reason}")]
    InvalidParameter {
        /// The setting, as the struct and the CLI spell it.
        name: &'static str,
        /// Why the value was refused.
        reason: String,
    },
}

/// Largest margin accepted, mm (a needle kept farther than this from everything has nowhere to
/// go in an MSK field of view).
const MAX_MARGIN_MM: f64 = 50.0;

impl PlanParams {
    /// Checks every setting: finite, and within its range (angles 0 ≤ min ≤ preferred and
    /// max < 90°, min ≤ max; margins 0 ≤ m < 50 mm; final approach 0–5 mm; a needle length
    /// above 0; a user target with finite lateral position and depth ≥ 0; at least one target
    /// kind). A NaN margin would make every comparison false and every entry look safe; a NaN
    /// target would plan to nowhere.
    pub fn validate(&self) -> Result<(), PlanError> {
        let bad =
            |name: &'static str, reason: String| Err(PlanError::InvalidParameter { name, reason });
        for (name, v) in [
            ("min_angle_deg", self.min_angle_deg),
            ("max_angle_deg", self.max_angle_deg),
            ("preferred_angle_deg", self.preferred_angle_deg),
            ("margin_mm", self.margin_mm),
            ("shadow_margin_mm", self.shadow_margin_mm),
            ("vessel_margin_mm", self.vessel_margin_mm),
            ("nerve_margin_mm", self.nerve_margin_mm),
            ("final_approach_mm", self.final_approach_mm),
            ("max_length_mm", self.max_length_mm.unwrap_or(1.0)),
        ] {
            if !v.is_finite() {
                return bad(name, format!("{v} is not a finite number"));
            }
        }
        if !(0.0..90.0).contains(&self.min_angle_deg) {
            return bad(
                "min_angle_deg",
                format!("{} (0 ≤ angle < 90)", self.min_angle_deg),
            );
        }
        if !(self.min_angle_deg..90.0).contains(&self.max_angle_deg) {
            return bad(
                "max_angle_deg",
                format!("{} (min_angle_deg ≤ angle < 90)", self.max_angle_deg),
            );
        }
        if !(0.0..90.0).contains(&self.preferred_angle_deg) {
            return bad(
                "preferred_angle_deg",
                format!("{} (0 ≤ angle < 90)", self.preferred_angle_deg),
            );
        }
        for (name, v) in [
            ("margin_mm", self.margin_mm),
            ("shadow_margin_mm", self.shadow_margin_mm),
            ("vessel_margin_mm", self.vessel_margin_mm),
            ("nerve_margin_mm", self.nerve_margin_mm),
        ] {
            if !(0.0..MAX_MARGIN_MM).contains(&v) {
                return bad(name, format!("{v} (0 ≤ margin < {MAX_MARGIN_MM} mm)"));
            }
        }
        if !(0.0..=preset::MAX_FINAL_APPROACH_MM).contains(&self.final_approach_mm) {
            return bad(
                "final_approach_mm",
                format!(
                    "{} (0 ≤ length ≤ {} mm)",
                    self.final_approach_mm,
                    preset::MAX_FINAL_APPROACH_MM
                ),
            );
        }
        if let Some(l) = self.max_length_mm {
            if l <= 0.0 {
                return bad("max_length_mm", format!("{l} (a length above 0)"));
            }
        }
        if self.targets.is_empty() {
            return bad("targets", "no target kind to look for".into());
        }
        if self.targets.contains(&TargetKind::User) {
            return bad(
                "targets",
                "\"user\" is not a kind to look for: give target_mm".into(),
            );
        }
        if let Some((x, y)) = self.target_mm {
            if !x.is_finite() || !y.is_finite() || y < 0.0 {
                return bad(
                    "target_mm",
                    format!("({x}, {y}): needs a finite lateral position and a depth ≥ 0"),
                );
            }
        }
        Ok(())
    }

    /// Sets the clearance from bone, shadow and vessels at once (nerves keep theirs).
    pub fn set_margins_mm(&mut self, mm: f64) {
        self.margin_mm = mm;
        self.shadow_margin_mm = mm;
        self.vessel_margin_mm = mm;
    }

    /// The rules the path check applies for a target of `kind`.
    fn rules(&self, kind: TargetKind) -> Vec<Rule> {
        let joint = kind == TargetKind::JointSpace;
        let mut rules = vec![
            Rule {
                label: Label::Bone,
                margin_mm: self.margin_mm,
                exempt_near_joint: joint,
                hard: true,
            },
            Rule {
                label: Label::Shadow,
                margin_mm: self.shadow_margin_mm,
                exempt_near_joint: joint,
                hard: true,
            },
            Rule {
                label: Label::Vessel,
                margin_mm: self.vessel_margin_mm,
                exempt_near_joint: false,
                hard: true,
            },
            Rule {
                label: Label::Nerve,
                margin_mm: self.nerve_margin_mm + NERVE_OUTLINE_ALLOWANCE_MM,
                exempt_near_joint: false,
                hard: true,
            },
        ];
        // A target beside a tendon or a nerve is reached without piercing a tendon (the
        // injectate would go into it); one inside a tendon pierces it by design. On the way to
        // a joint, effusion or user target a tendon may be crossed: the cost avoids it where
        // it can, and the plan reports the distance (0 when crossed) and says so.
        rules.push(Rule {
            label: Label::Tendon,
            margin_mm: 0.0,
            exempt_near_joint: false,
            hard: matches!(kind, TargetKind::Peritendinous | TargetKind::Perineural),
        });
        rules
    }

    /// The final approach for a target of `kind`, mm.
    fn approach_mm(&self, kind: TargetKind) -> f64 {
        if kind == TargetKind::JointSpace {
            self.final_approach_mm
        } else {
            0.0
        }
    }
}

impl Default for PlanParams {
    fn default() -> Self {
        PlanParams {
            min_angle_deg: 15.0,
            max_angle_deg: 45.0,
            preferred_angle_deg: 30.0,
            margin_mm: 2.0,
            shadow_margin_mm: 2.0,
            vessel_margin_mm: 2.0,
            nerve_margin_mm: 2.0,
            targets: vec![
                TargetKind::JointSpace,
                TargetKind::Effusion,
                TargetKind::Peritendinous,
            ],
            final_approach_mm: 2.0,
            max_length_mm: None,
            preferred_side: None,
            target_mm: None,
            preset: None,
            expected_depth_mm: None,
        }
    }
}

/// Length scale of the cost's length term, mm.
const LENGTH_SCALE_MM: f64 = 40.0;
/// Angle scale of the cost's angle term, degrees.
const ANGLE_SCALE_DEG: f64 = 15.0;
/// Clearance scale of the cost's clearance term, mm.
const CLEARANCE_SCALE_MM: f64 = 1.0;
/// Cost of entering from the side a preset does not prefer (as much as 15° off the angle).
const SIDE_PENALTY: f64 = 1.0;
/// Cost of crossing a tendon on the way to a target that allows it (as much as 30° off the
/// angle: a path around the tendon is preferred where there is one).
const TENDON_PENALTY: f64 = 2.0;
/// Spacing of the samples that screen candidate paths and check that a path stays inside the
/// imaging region, mm.
const SAMPLE_MM: f64 = 0.25;

/// Defines a fieldless enum whose JSON (and TOML) spelling, `as_str` and `Display` are the
/// given strings, and which compares equal to its string (so `plan.status == "ok"` reads).
macro_rules! spelled_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vdoc])* #[serde(rename = $text)] $variant),+
        }
        impl $name {
            /// The JSON spelling.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    };
}

spelled_enum! {
    /// Whether a path was found.
    PlanStatus {
        /// A safe path was found.
        Ok => "ok",
        /// No entry satisfies the constraints, or there is no target; `reason` says which.
        NoSafePath => "no_safe_path",
        /// The frame has no usable calibration and the caller gave no spacing: nothing can be
        /// planned in millimetres.
        NoCalibration => "no_calibration",
    }
}

spelled_enum! {
    /// What the target is.
    TargetKind {
        /// The centre of a joint space between two bone ends.
        JointSpace => "joint_space",
        /// The middle of an effusion or bursa, 1 mm above its floor (or the nearest point that
        /// keeps every margin).
        Effusion => "effusion",
        /// Just superficial to a tendon.
        Peritendinous => "peritendinous",
        /// Inside a tendon (the only kind that may pierce one).
        Intratendinous => "intratendinous",
        /// Beside a nerve, outside its margin.
        Perineural => "perineural",
        /// Given by the user.
        User => "user",
    }
}

spelled_enum! {
    /// The side of the target the needle enters from.
    Side {
        /// From the left of the image.
        Left => "left",
        /// From the right of the image.
        Right => "right",
    }
}

/// A point in full-frame px and in mm.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PlanPoint {
    /// Full-frame (column, row).
    pub px: [f64; 2],
    /// (lateral, depth) mm.
    pub mm: [f64; 2],
}

/// Exact distance from the whole path to each structure the planner avoids, mm; `null` where
/// the structure is not in the frame (or, for a tendon, is not avoided).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Clearances {
    /// Bone surface.
    pub bone: Option<f64>,
    /// Acoustic shadow.
    pub shadow: Option<f64>,
    /// Vessels.
    pub vessel: Option<f64>,
    /// Nerves.
    pub nerve: Option<f64>,
    /// Tendons.
    pub tendon: Option<f64>,
}

impl Clearances {
    fn from_check(c: &PathCheck) -> Clearances {
        let mut out = Clearances::default();
        for &(label, d) in &c.clearances {
            let slot = match label {
                Label::Bone => &mut out.bone,
                Label::Shadow => &mut out.shadow,
                Label::Vessel => &mut out.vessel,
                Label::Nerve => &mut out.nerve,
                Label::Tendon => &mut out.tendon,
                _ => continue,
            };
            *slot = Some(d);
        }
        out
    }

    /// The nearest of the structures always avoided (nerve, vessel, bone, shadow) and its
    /// distance, mm.
    pub fn nearest(&self) -> Option<(Label, f64)> {
        [
            (Label::Nerve, self.nerve),
            (Label::Vessel, self.vessel),
            (Label::Bone, self.bone),
            (Label::Shadow, self.shadow),
        ]
        .into_iter()
        .filter_map(|(l, d)| d.map(|d| (l, d)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
    }
}

/// The margins a plan keeps from each structure, mm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Margins {
    /// Bone surface.
    pub bone: f64,
    /// Acoustic shadow.
    pub shadow: f64,
    /// Vessels.
    pub vessel: f64,
    /// Nerves.
    pub nerve: f64,
}

impl Margins {
    fn of(p: &PlanParams) -> Margins {
        Margins {
            bone: p.margin_mm,
            shadow: p.shadow_margin_mm,
            vessel: p.vessel_margin_mm,
            nerve: p.nerve_margin_mm,
        }
    }

    /// (label, margin) pairs.
    pub fn by_label(&self) -> [(Label, f64); 4] {
        [
            (Label::Bone, self.bone),
            (Label::Shadow, self.shadow),
            (Label::Vessel, self.vessel),
            (Label::Nerve, self.nerve),
        ]
    }
}

/// The result of planning one frame. Serialises to the documented JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct NeedlePlan {
    /// `"ok"`, `"no_safe_path"` or `"no_calibration"`.
    pub status: PlanStatus,
    /// Why there is no path (null when ok).
    pub reason: Option<String>,
    /// Skin entry point.
    pub entry: Option<PlanPoint>,
    /// Target.
    pub target: Option<PlanPoint>,
    /// Angle between needle and skin line at the entry, degrees.
    pub angle_deg: Option<f64>,
    /// Target depth below the transducer face, mm; along the beam for a fan (from the near
    /// arc, where the probe face is).
    pub depth_mm: Option<f64>,
    /// Needle path length from entry to target, mm.
    pub length_mm: Option<f64>,
    /// Smallest exact distance from the whole path (entry to target) to any structure it must
    /// avoid (bone, shadow, vessel, nerve; a tendon when the target lies beside one), mm;
    /// `null` when there is none in the frame (no sentinel value).
    pub clearance_mm: Option<f64>,
    /// The same per structure.
    pub clearances_mm: Clearances,
    /// The final approach where bone and shadow needed only not be crossed, mm (joint-space
    /// targets only; null otherwise).
    pub final_approach_mm: Option<f64>,
    /// `"joint_space"`, `"effusion"`, `"peritendinous"`, `"intratendinous"`, `"perineural"`
    /// or `"user"`.
    pub target_kind: Option<TargetKind>,
    /// `"left"` or `"right"`: the side of the target the needle enters from.
    pub side: Option<Side>,
    /// The margins kept, mm (bone, shadow, vessel, nerve): what the overlay draws as
    /// keep-out zones.
    pub margins_mm: Margins,
    /// The site preset planned for.
    pub preset: Option<String>,
    /// Where the spacing came from (`given`: by the caller); null without calibration.
    pub calibration: Option<CalibrationSource>,
    /// Things the user should know (e.g. an imaging depth the preset does not expect).
    pub notes: Vec<String>,
}

impl NeedlePlan {
    fn refused(status: PlanStatus, reason: impl Into<String>, params: &PlanParams) -> NeedlePlan {
        NeedlePlan {
            status,
            reason: Some(reason.into()),
            entry: None,
            target: None,
            angle_deg: None,
            depth_mm: None,
            length_mm: None,
            clearance_mm: None,
            clearances_mm: Clearances::default(),
            final_approach_mm: None,
            target_kind: None,
            side: None,
            margins_mm: Margins::of(params),
            preset: params.preset.clone(),
            calibration: None,
            notes: Vec::new(),
        }
    }

    fn none(
        reason: impl Into<String>,
        target: Option<(PlanPoint, TargetKind)>,
        g: &Geometry<'_>,
        params: &PlanParams,
    ) -> NeedlePlan {
        let mut p = NeedlePlan::refused(PlanStatus::NoSafePath, reason, params);
        p.target = target.map(|t| t.0);
        p.depth_mm = target.map(|t| t.0.mm[1]);
        p.target_kind = target.map(|t| t.1);
        p.calibration = Some(g.source);
        p
    }

    /// Whether a path was found.
    pub fn is_ok(&self) -> bool {
        self.status == PlanStatus::Ok
    }
}

/// Pixel ↔ mm conversions of a calibrated frame.
struct Geometry<'a> {
    frame: &'a Frame,
    mm: (f64, f64),
    top_row: f64,
    source: CalibrationSource,
}

impl<'a> Geometry<'a> {
    /// The frame's calibration; `None` when it has no usable one.
    fn new(frame: &'a Frame) -> Option<Self> {
        match frame.calibration {
            crate::frame::Calibration::Ok {
                mm_per_px_x,
                mm_per_px_y,
                source,
                ..
            } => Some(Geometry {
                frame,
                mm: (mm_per_px_x, mm_per_px_y),
                top_row: frame.region.bounds.y0 as f64,
                source,
            }),
            _ => None,
        }
    }
    fn to_mm(&self, x: f64, y: f64) -> [f64; 2] {
        let (a, b) = self
            .frame
            .calibration
            .px_to_mm(x, y, self.top_row)
            .unwrap_or((x * self.mm.0, y * self.mm.1));
        [a, b]
    }
    fn point(&self, x: f64, y: f64) -> PlanPoint {
        PlanPoint {
            px: [x, y],
            mm: self.to_mm(x, y),
        }
    }
    fn mm_to_px(&self, xm: f64, ym: f64) -> (f64, f64) {
        self.frame
            .calibration
            .mm_to_px(xm, ym, self.top_row)
            .unwrap_or((xm / self.mm.0, ym / self.mm.1))
    }
}

/// The top edge (skin line) of the imaging region: per column, the first row inside it. For
/// a fitted fan, only the near arc is skin: a column whose first row lies on a straight side
/// of the fan (farther from the apex than the arc) has no entry.
fn skin_line(frame: &Frame) -> Vec<Option<usize>> {
    let b = frame.region.bounds;
    let line = (0..frame.width())
        .map(|x| {
            if x < b.x0 || x >= b.x1 {
                return None;
            }
            let y = (b.y0..b.y1).find(|y| frame.region.contains(x, *y))?;
            match frame.region.fan {
                Some(fan) => {
                    let (r, _) = fan.polar(x as f64 + 0.5, y as f64 + 0.5);
                    (r - fan.r_near <= ON_ARC_PX).then_some(y)
                }
                None => Some(y),
            }
        })
        .collect::<Vec<_>>();
    drop_silent_columns(drop_fan_sides(line, frame), frame)
}

/// Grey level under which the first millimetre beneath the top edge holds no echo at all: the
/// black corners beside a fan that a rectangular region declares (exactly 0 there), where
/// there is no skin.
const SILENT_ECHO: f32 = 1.0;
/// Depth beneath the top edge searched for an echo, mm.
const SKIN_ECHO_MM: f64 = 1.0;

/// Drops the columns whose first millimetre holds no echo at all: beside a fan that could not
/// be found inside its declared rectangle, an entry there would start in air, off the skin.
fn drop_silent_columns(line: Vec<Option<usize>>, frame: &Frame) -> Vec<Option<usize>> {
    let my = frame
        .calibration
        .mm_per_px()
        .map_or(crate::segment::ASSUMED_MM_PER_PX, |m| m.1);
    let rows = ((SKIN_ECHO_MM / my).ceil() as usize).max(1);
    let h = frame.height();
    line.into_iter()
        .enumerate()
        .map(|(x, y)| {
            let y = y?;
            let echo = (y..(y + rows).min(h)).any(|r| frame.intensity[[r, x]] >= SILENT_ECHO);
            echo.then_some(y)
        })
        .collect()
}

/// Depth range of a sector mask's top edge under which it is flat (a linear image with dark
/// corners, whose top is skin), mm; a fan's near arc sags more than this over its width.
const FLAT_TOP_MM: f64 = 2.0;

/// Steepest top edge that can be skin, rows per column: an arc's tangent at a fan's corner
/// (up to 45° from horizontal for the widest phased arrays); a fan's straight sides are
/// steeper.
const SKIN_MAX_SLOPE: f64 = 1.0;
/// Columns either side over which that slope (and the skin's direction) is measured.
const SKIN_SLOPE_REACH: usize = 3;

/// For a sector whose fan could not be fitted, the top edge also runs down its straight sides,
/// which are not skin: drops the columns where the top edge is steeper than an arc can be.
fn drop_fan_sides(line: Vec<Option<usize>>, frame: &Frame) -> Vec<Option<usize>> {
    if frame.region.shape != crate::frame::RegionShape::Sector || frame.region.fan.is_some() {
        return line;
    }
    let n = line.len();
    (0..n)
        .map(|x| {
            let y = line[x]?;
            let (a, b) = (
                x.saturating_sub(SKIN_SLOPE_REACH),
                (x + SKIN_SLOPE_REACH).min(n - 1),
            );
            let (ya, yb) = (line[a]?, line[b]?);
            let slope = (yb as f64 - ya as f64).abs() / (b - a).max(1) as f64;
            (slope <= SKIN_MAX_SLOPE).then_some(y)
        })
        .collect()
}

/// A fan's first row in a column is on the near arc when it lies within this distance of it,
/// px (the arc crosses a column within one pixel; its rendering rounds to pixel centres).
const ON_ARC_PX: f64 = 1.5;

/// The angle between a needle from `entry` (full-frame px, on the skin line) to `target_mm`
/// and the skin line at the entry, degrees; `None` when the needle does not go deeper. The
/// one angle definition of the planner and the cine smoother.
fn needle_angle(
    g: &Geometry<'_>,
    skin: &[Option<usize>],
    entry: [f64; 2],
    target_mm: [f64; 2],
) -> Option<f64> {
    let e = g.to_mm(entry[0], entry[1]);
    let (dx, dy) = (target_mm[0] - e[0], target_mm[1] - e[1]);
    if dy <= 0.0 {
        return None;
    }
    let n = skin.len();
    let ex = (entry[0].round().max(0.0) as usize).min(n.saturating_sub(1));
    let (xa, xb) = (
        ex.saturating_sub(SKIN_SLOPE_REACH),
        (ex + SKIN_SLOPE_REACH).min(n.saturating_sub(1)),
    );
    let (sx, sy) = match (
        skin.get(xa).copied().flatten(),
        skin.get(xb).copied().flatten(),
    ) {
        (Some(ya), Some(yb)) if xb > xa => {
            ((xb - xa) as f64 * g.mm.0, (yb as f64 - ya as f64) * g.mm.1)
        }
        _ => (1.0, 0.0),
    };
    let len = dx.hypot(dy);
    let cos = ((dx * sx + dy * sy) / (len * sx.hypot(sy))).abs();
    Some(cos.clamp(0.0, 1.0).acos().to_degrees())
}

/// Everything one frame's path checks need, for one target kind.
struct Planner<'a> {
    g: Geometry<'a>,
    skin: Vec<Option<usize>>,
    obstacles: Obstacles,
    params: &'a PlanParams,
    kind: TargetKind,
    approach_mm: f64,
}

/// Why a candidate path was refused, for the summary reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Angle,
    Length,
    Outside,
    Unsafe,
}

impl Refusal {
    /// Why, in words.
    fn describe(self, p: &PlanParams) -> String {
        match self {
            Refusal::Angle => format!(
                "the needle's angle to the skin is outside {}–{}°",
                p.min_angle_deg, p.max_angle_deg
            ),
            Refusal::Length => format!(
                "the path is longer than the needle ({} mm)",
                p.max_length_mm.unwrap_or(f64::INFINITY)
            ),
            Refusal::Outside => "the path leaves the imaging region".into(),
            Refusal::Unsafe => "the path is too close to or across an avoided structure".into(),
        }
    }
}

impl<'a> Planner<'a> {
    fn new(g: Geometry<'a>, seg: &Segmentation, params: &'a PlanParams, kind: TargetKind) -> Self {
        Planner::with(g, seg, params, kind, None)
    }

    /// As `new`, reusing `obstacles` when they were built for this kind's rules.
    fn with(
        g: Geometry<'a>,
        seg: &Segmentation,
        params: &'a PlanParams,
        kind: TargetKind,
        obstacles: Option<(TargetKind, Obstacles)>,
    ) -> Self {
        let obstacles = match obstacles {
            Some((k, o)) if params.rules(k) == params.rules(kind) => o,
            _ => Obstacles::new(&seg.obstacle_labels(), g.mm, &params.rules(kind)),
        };
        Planner {
            skin: skin_line(g.frame),
            g,
            obstacles,
            params,
            kind,
            approach_mm: params.approach_mm(kind),
        }
    }

    /// The checks that need no obstacle: angle, length, inside the region. Returns the angle
    /// and length.
    fn geometry(&self, entry: [f64; 2], target: [f64; 2]) -> Result<(f64, f64), Refusal> {
        let p = self.params;
        let t_mm = self.g.to_mm(target[0], target[1]);
        let angle = needle_angle(&self.g, &self.skin, entry, t_mm).ok_or(Refusal::Angle)?;
        if angle < p.min_angle_deg || angle > p.max_angle_deg {
            return Err(Refusal::Angle);
        }
        let e_mm = self.g.to_mm(entry[0], entry[1]);
        let len = (t_mm[0] - e_mm[0]).hypot(t_mm[1] - e_mm[1]);
        if p.max_length_mm.is_some_and(|m| len > m) {
            return Err(Refusal::Length);
        }
        let (h, w) = (self.g.frame.height(), self.g.frame.width());
        let steps = (len / SAMPLE_MM).ceil().max(1.0) as usize;
        for k in 0..=steps {
            let s = k as f64 / steps as f64;
            let (x, y) = (
                (entry[0] + s * (target[0] - entry[0])).round(),
                (entry[1] + s * (target[1] - entry[1])).round(),
            );
            if x < 0.0 || y < 0.0 || x >= w as f64 || y >= h as f64 {
                return Err(Refusal::Outside);
            }
            if !self.g.frame.region.contains(x as usize, y as usize) {
                return Err(Refusal::Outside);
            }
        }
        Ok((angle, len))
    }

    /// The exact check of one path; the plan if it is safe, else why not.
    fn evaluate(&self, entry: [f64; 2], target: [f64; 2]) -> Result<NeedlePlan, String> {
        let (angle, len) = self
            .geometry(entry, target)
            .map_err(|r| r.describe(self.params))?;
        let check = self.obstacles.check(entry, target, self.approach_mm);
        if let Some(v) = check.violation {
            return Err(v);
        }
        let clearances = Clearances::from_check(&check);
        let t = self.g.point(target[0], target[1]);
        let mut plan = NeedlePlan {
            status: PlanStatus::Ok,
            reason: None,
            entry: Some(self.g.point(entry[0], entry[1])),
            target: Some(t),
            angle_deg: Some(angle),
            depth_mm: Some(t.mm[1]),
            length_mm: Some(len),
            clearance_mm: check.nearest_hard_mm,
            clearances_mm: clearances,
            final_approach_mm: (self.approach_mm > 0.0).then_some(self.approach_mm.min(len)),
            target_kind: Some(self.kind),
            side: Some(if entry[0] < target[0] {
                Side::Left
            } else {
                Side::Right
            }),
            margins_mm: Margins::of(self.params),
            preset: self.params.preset.clone(),
            calibration: Some(self.g.source),
            notes: Vec::new(),
        };
        if self.kind != TargetKind::Intratendinous && clearances.tendon == Some(0.0) {
            plan.notes.push("the path crosses a tendon".into());
        }
        if clearances.nerve.is_some() {
            plan.notes.push(format!(
                "nerves are kept {:.1} mm away: the {:.1} mm margin plus {NERVE_OUTLINE_ALLOWANCE_MM} mm for the uncertainty of a nerve's outline",
                self.params.nerve_margin_mm + NERVE_OUTLINE_ALLOWANCE_MM,
                self.params.nerve_margin_mm
            ));
        }
        finish(self.g.frame, self.params, &mut plan);
        Ok(plan)
    }

    /// The best safe path to `target` over every skin entry.
    fn search(&self, target: [f64; 2]) -> Result<NeedlePlan, String> {
        let mut counts = [0usize; 4];
        let mut candidates: Vec<(f64, [f64; 2])> = Vec::new();
        for (ex, ey) in self
            .skin
            .iter()
            .enumerate()
            .filter_map(|(x, y)| y.map(|y| (x as f64, y as f64)))
        {
            if (ex - target[0]).abs() < 1.0 {
                continue;
            }
            let entry = [ex, ey];
            let (angle, len) = match self.geometry(entry, target) {
                Ok(v) => v,
                Err(r) => {
                    counts[r as usize] += 1;
                    continue;
                }
            };
            let Some((clearance, through_tendon)) =
                self.obstacles
                    .screen(entry, target, self.approach_mm, SAMPLE_MM)
            else {
                counts[Refusal::Unsafe as usize] += 1;
                continue;
            };
            let side = if ex < target[0] {
                Side::Left
            } else {
                Side::Right
            };
            let cost = len / LENGTH_SCALE_MM
                + (angle - self.params.preferred_angle_deg).abs() / ANGLE_SCALE_DEG
                + CLEARANCE_SCALE_MM / clearance.max(1e-3)
                + if self.params.preferred_side.is_some_and(|s| s != side) {
                    SIDE_PENALTY
                } else {
                    0.0
                }
                + if through_tendon { TENDON_PENALTY } else { 0.0 };
            candidates.push((cost, entry));
        }
        candidates.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut last = None;
        for (_, entry) in candidates {
            match self.evaluate(entry, target) {
                Ok(plan) => return Ok(plan),
                Err(why) => {
                    counts[Refusal::Unsafe as usize] += 1;
                    last = Some(why);
                }
            }
        }
        if counts.iter().sum::<usize>() == 0 {
            return Err("no skin entry point on either side of the target".into());
        }
        let p = self.params;
        if counts[Refusal::Angle as usize] == counts.iter().sum::<usize>() {
            return Err(format!(
                "every entry on the skin line in view gives an angle outside {}–{}° (the target is too deep or too shallow for this field of view; an entry beside the probe, out of view, is not planned)",
                p.min_angle_deg, p.max_angle_deg
            ));
        }
        let length = p
            .max_length_mm
            .map(|m| format!(", {} longer than {m} mm", counts[Refusal::Length as usize]))
            .unwrap_or_default();
        Err(format!(
            "no entry satisfies the constraints ({} outside {}–{}°{length}, {} leave the image, {} too close to or across an avoided structure{})",
            counts[Refusal::Angle as usize],
            p.min_angle_deg,
            p.max_angle_deg,
            counts[Refusal::Outside as usize],
            counts[Refusal::Unsafe as usize],
            last.map(|l| format!("; the best such path {l}")).unwrap_or_default()
        ))
    }
}

/// Plans a needle path for one segmented frame.
pub fn plan(frame: &Frame, seg: &Segmentation, params: &PlanParams) -> NeedlePlan {
    plan_keeping(frame, seg, params).0
}

/// Plans a frame and smooths the plan with `smoother` (a cine), reusing the obstacles the plan
/// was checked against. Returns the raw and the smoothed plan.
pub fn plan_smoothed(
    frame: &Frame,
    seg: &Segmentation,
    params: &PlanParams,
    smoother: &mut PlanSmoother,
) -> (NeedlePlan, NeedlePlan) {
    let (raw, planner) = plan_keeping(frame, seg, params);
    let smooth = smoother.smooth_with(planner.as_ref(), frame, seg, &raw, params);
    (raw, smooth)
}

/// `plan`, also giving the planner (frame geometry and obstacles) when one was built.
fn plan_keeping<'a>(
    frame: &'a Frame,
    seg: &Segmentation,
    params: &'a PlanParams,
) -> (NeedlePlan, Option<Planner<'a>>) {
    // Settings, frame or label map that break the invariants get no path, never a panic.
    if let Err(e) = params.validate() {
        return (
            NeedlePlan::refused(PlanStatus::NoSafePath, e.to_string(), params),
            None,
        );
    }
    // The layout is what planning indexes by; the pixel values are not read here.
    if let Err(e) = frame.check_layout() {
        return (
            NeedlePlan::refused(PlanStatus::NoSafePath, e.to_string(), params),
            None,
        );
    }
    if seg.labels.dim() != frame.intensity.dim() {
        let why = format!(
            "the label map ({:?}) is not the frame's size ({}x{})",
            seg.labels.dim(),
            frame.width(),
            frame.height()
        );
        return (
            NeedlePlan::refused(PlanStatus::NoSafePath, why, params),
            None,
        );
    }
    let Some(g) = Geometry::new(frame) else {
        let why = format!(
            "the frame has no usable calibration ({}): no plan in mm without the pixel spacing (give it with --spacing-mm or PipelineConfig::spacing_mm)",
            match &frame.calibration {
                crate::frame::Calibration::Unusable { reason } => reason.as_str(),
                _ => "none in the file",
            }
        );
        let mut p = NeedlePlan::refused(PlanStatus::NoCalibration, why, params);
        finish(frame, params, &mut p);
        return (p, None);
    };
    let mut built = None;
    let (target, kind) = match params.target_mm {
        Some((xm, ym)) => {
            let (x, y) = g.mm_to_px(xm, ym);
            ([x, y], TargetKind::User)
        }
        None => match target::choose(seg, &g, params, &mut built) {
            Some(t) => t,
            None => {
                let kinds: Vec<&str> = params.targets.iter().map(|k| k.as_str()).collect();
                let mut p = NeedlePlan::none(
                    format!("no target found ({} looked for)", kinds.join(", ")),
                    None,
                    &g,
                    params,
                );
                finish(frame, params, &mut p);
                return (p, None);
            }
        },
    };
    let planner = Planner::with(
        g,
        seg,
        params,
        kind,
        built.map(|o| (TargetKind::Effusion, o)),
    );
    let point = planner.g.point(target[0], target[1]);
    let (h, w) = seg.labels.dim();
    let refuse = |why: String| {
        let mut p = NeedlePlan::none(why, Some((point, kind)), &planner.g, params);
        finish(frame, params, &mut p);
        p
    };
    if target[0] < 0.0
        || target[1] < 0.0
        || target[0] >= w as f64
        || target[1] >= h as f64
        || !frame
            .region
            .contains(target[0] as usize, target[1] as usize)
    {
        let p = refuse("the target lies outside the imaging region".into());
        return (p, Some(planner));
    }
    if let Some(l) = planner
        .obstacles
        .at(target[0].round() as usize, target[1].round() as usize)
    {
        let (tx, ty) = (target[0].round() as usize, target[1].round() as usize);
        let labelled = seg.labels.get((ty, tx)).copied() == Some(l.code());
        let p = refuse(if labelled {
            format!("the target lies in {}", l.name())
        } else {
            format!(
                "the target lies in possible {} (probability at least {} by the classifier)",
                l.name(),
                crate::segment::pixels::POSSIBLE_NERVE_PROBABILITY
            )
        });
        return (p, Some(planner));
    }
    // A fan whose arc could not be fitted (a dark near field) has no known skin line: its
    // top edge runs down the fan's straight sides too, and an entry there starts off the skin.
    // (A sector mask with a flat top is a linear image with dark corners: its top is skin.)
    let rows: Vec<usize> = planner.skin.iter().flatten().copied().collect();
    let sag_mm = match (rows.iter().min(), rows.iter().max()) {
        (Some(a), Some(b)) => (b - a) as f64 * planner.g.mm.1,
        _ => 0.0,
    };
    if frame.region.shape == crate::frame::RegionShape::Sector
        && frame.region.fan.is_none()
        && sag_mm > FLAT_TOP_MM
    {
        let p = refuse("the convex fan could not be fitted to the image (a dark near field?), so the skin arc where a needle enters is not known".into());
        return (p, Some(planner));
    }
    let mut p = match planner.search(target) {
        Ok(p) => p,
        Err(why) => refuse(why),
    };
    if seg.possible_nerve.is_some() {
        p.notes.push(format!(
            "the nerve margin is also kept from possible nerve (not labelled nerve, but nerve probability at least {})",
            crate::segment::pixels::POSSIBLE_NERVE_PROBABILITY
        ));
    }
    (p, Some(planner))
}

/// What every plan gets at the end: the depth along the beam for a fan, and the notes.
fn finish(frame: &Frame, params: &PlanParams, p: &mut NeedlePlan) {
    beam_depth(frame, p);
    if let (Some([lo, hi]), Some((_, my))) =
        (params.expected_depth_mm, frame.calibration.mm_per_px())
    {
        let b = frame.region.bounds;
        let depth = b.height() as f64 * my;
        if depth < lo || depth > hi {
            p.notes.push(format!(
                "the imaging depth ({depth:.0} mm) is outside what preset {} expects ({lo:.0}–{hi:.0} mm)",
                params.preset.as_deref().unwrap_or("?")
            ));
        }
    }
}

/// For a fan, the target's depth is measured along its beam from the near arc (the probe
/// face), not straight down from the top row.
fn beam_depth(frame: &Frame, p: &mut NeedlePlan) {
    let (Some(fan), Some(t), Some(mm)) =
        (frame.region.fan, p.target, frame.calibration.mm_per_px())
    else {
        return;
    };
    let (dx, dy) = (t.px[0] - fan.apex[0], t.px[1] - fan.apex[1]);
    let r_mm = (dx * mm.0).hypot(dy * mm.1);
    let near_mm = fan.r_near * r_mm / dx.hypot(dy).max(1e-9);
    p.depth_mm = Some(r_mm - near_mm);
}

/// Checks the path `entry` → `target` (full-frame px) on `frame` against `seg` with the
/// planner's own checks (angle, length, region, the exact margins of [`path::Obstacles`]) for
/// a target of `kind`; the plan when it is safe, else why not. The evaluation and embedding
/// software judge paths with this, so that nothing judges by other rules than the planner.
pub fn check_path(
    frame: &Frame,
    seg: &Segmentation,
    params: &PlanParams,
    kind: TargetKind,
    entry: [f64; 2],
    target: [f64; 2],
) -> Result<NeedlePlan, String> {
    params.validate().map_err(|e| e.to_string())?;
    let g = Geometry::new(frame).ok_or("the frame has no usable calibration")?;
    if seg.labels.dim() != frame.intensity.dim() {
        return Err("the label map is not the frame's size".into());
    }
    Planner::new(g, seg, params, kind).evaluate(entry, target)
}

/// Temporal smoothing of plans over a cine, so that the suggestion does not jitter: the target
/// follows an exponential moving average (in px); the entry stays where it was while it still
/// gives a safe path to the smoothed target (else it moves by the same average, else to the raw
/// plan's). A change of status, target kind or side resets it. Every smoothed path is
/// re-checked by the planner's own check ([`check_path`]).
#[derive(Debug, Clone, Default)]
pub struct PlanSmoother {
    state: Option<([f64; 2], [f64; 2])>,
    kind: Option<TargetKind>,
}

/// Weight of the newest frame in the moving average.
pub const SMOOTHING_ALPHA: f64 = 0.3;

impl PlanSmoother {
    /// A smoother with no history.
    pub fn new() -> Self {
        Self::default()
    }

    /// Smooths `raw` (planned on `frame` with `seg`).
    pub fn smooth(
        &mut self,
        frame: &Frame,
        seg: &Segmentation,
        raw: &NeedlePlan,
        params: &PlanParams,
    ) -> NeedlePlan {
        self.smooth_with(None, frame, seg, raw, params)
    }

    /// `smooth`, with the planner `raw` came from when there is one (its obstacles are reused).
    fn smooth_with(
        &mut self,
        planner: Option<&Planner<'_>>,
        frame: &Frame,
        seg: &Segmentation,
        raw: &NeedlePlan,
        params: &PlanParams,
    ) -> NeedlePlan {
        let (Some(e), Some(t), Some(kind)) = (raw.entry, raw.target, raw.target_kind) else {
            self.state = None;
            return raw.clone();
        };
        if !raw.is_ok() {
            self.state = None;
            return raw.clone();
        }
        // A different kind of target is a different target: no averaging across it.
        if self.kind != raw.target_kind {
            self.state = None;
            self.kind = raw.target_kind;
        }
        let mix = |a: [f64; 2], b: [f64; 2]| {
            [
                a[0] + SMOOTHING_ALPHA * (b[0] - a[0]),
                a[1] + SMOOTHING_ALPHA * (b[1] - a[1]),
            ]
        };
        if let (Some((pe, pt)), Some(g)) = (self.state, Geometry::new(frame)) {
            let built;
            let planner = match planner.filter(|p| p.kind == kind) {
                Some(p) => p,
                None => {
                    built = Planner::new(g, seg, params, kind);
                    &built
                }
            };
            // Even when this frame's best entry is on the other side, the previous one is kept
            // if it is still safe: near-equal costs must not flip the suggestion.
            let st = mix(pt, t.px);
            let on_skin = |at: [f64; 2]| {
                let x = at[0].round().clamp(0.0, (frame.width().max(1) - 1) as f64) as usize;
                [x as f64, planner.skin[x].map(|y| y as f64).unwrap_or(at[1])]
            };
            // Keep the previous entry while it still gives a safe path (hysteresis: the
            // exhaustive search may flip between near-equal entries), else move it.
            for entry in [pe, on_skin(mix(pe, e.px))] {
                if let Ok(plan) = planner.evaluate(entry, st) {
                    self.state = Some((entry, st));
                    return plan;
                }
            }
        }
        self.state = Some((e.px, t.px));
        raw.clone()
    }
}
