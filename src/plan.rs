//! In-plane needle path planning: a straight needle from a skin entry point to a target, kept
//! clear of bone, acoustic shadow and vessels.
//!
//! - Target: given in mm, or chosen: the centre of the joint space (label 4 between two bone
//!   ends), else the deepest safe point of an effusion (label 4 over bone), else just superficial
//!   to the tendon's midpoint (peritendinous).
//! - Entry: every column of the skin line (the top edge of the imaging region) on either side
//!   of the target is tried; the search is exhaustive, not sampled.
//! - Constraints: the angle to the skin line within [min, max]; the whole path inside the
//!   imaging region; at least `margin_mm` from bone, shadow and vessels, except on the final
//!   2 mm before the target, where the path must only not cross them (a joint target lies
//!   between bones by nature).
//! - Cost: length / 40 mm + |angle − preferred| / 15° + 1 mm / clearance.
//!
//! Clearance uses an exact Euclidean distance transform in millimetres (anisotropic spacing
//! allowed). A frame without a usable calibration is planned with an assumed spacing and says
//! so; a frame with no target or no feasible entry gets `no_safe_path` with the reason.

use ndarray::Array2;
use rayon::prelude::*;
use serde::Serialize;

use crate::frame::Frame;
use crate::label::Label;
use crate::segment::{Segmentation, ASSUMED_MM_PER_PX};

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
    /// Clearance from bone, shadow and vessels, mm.
    pub margin_mm: f64,
    /// A target given by the user: (lateral mm, depth mm) from the reference pixel and the
    /// transducer face.
    pub target_mm: Option<(f64, f64)>,
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

impl PlanParams {
    /// Checks every setting: finite, and within its range (angles 0 ≤ min ≤ preferred and
    /// max < 90°, min ≤ max; margin 0 ≤ m < 50 mm; a user target with finite lateral position
    /// and depth ≥ 0). A NaN margin would make every comparison false and every entry look
    /// safe; a NaN target would plan to nowhere.
    pub fn validate(&self) -> Result<(), PlanError> {
        let bad =
            |name: &'static str, reason: String| Err(PlanError::InvalidParameter { name, reason });
        for (name, v) in [
            ("min_angle_deg", self.min_angle_deg),
            ("max_angle_deg", self.max_angle_deg),
            ("preferred_angle_deg", self.preferred_angle_deg),
            ("margin_mm", self.margin_mm),
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
        if !(0.0..50.0).contains(&self.margin_mm) {
            return bad(
                "margin_mm",
                format!("{} (0 ≤ margin < 50 mm)", self.margin_mm),
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
}

impl Default for PlanParams {
    fn default() -> Self {
        PlanParams {
            min_angle_deg: 15.0,
            max_angle_deg: 45.0,
            preferred_angle_deg: 30.0,
            margin_mm: 2.0,
            target_mm: None,
        }
    }
}

/// The final stretch of the path, next to the target, where only crossing is forbidden (a
/// joint target lies between bones by nature), mm; never more than the margin.
const APPROACH_MM: f64 = 2.0;

fn approach(params: &PlanParams) -> f64 {
    APPROACH_MM.min(params.margin_mm)
}

/// Length scale of the cost's length term, mm.
const LENGTH_SCALE_MM: f64 = 40.0;
/// Angle scale of the cost's angle term, degrees.
const ANGLE_SCALE_DEG: f64 = 15.0;
/// Clearance scale of the cost's clearance term, mm.
const CLEARANCE_SCALE_MM: f64 = 1.0;
/// Path samples per mm.
const SAMPLES_PER_MM: f64 = 4.0;
/// The peritendinous target sits this far above the tendon, mm.
const PERITENDINOUS_MM: f64 = 0.5;
/// Thinnest effusion the planner aims into, mm: the tip of a 21–22 G needle (0.7–0.8 mm) with
/// its bevel must sit inside with room on both sides; thinner fluid is left for the
/// peritendinous target.
const EFFUSION_MIN_DEPTH_MM: f64 = 2.0;

/// Defines a fieldless enum whose JSON spelling, `as_str` and `Display` are the given strings,
/// and which compares equal to its string (so `plan.status == "ok"` reads as before).
macro_rules! spelled_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
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
    }
}

spelled_enum! {
    /// What the target is.
    TargetKind {
        /// The centre of a joint space between two bone ends.
        JointSpace => "joint_space",
        /// The deepest safe point of an effusion over bone.
        Effusion => "effusion",
        /// Just superficial to a tendon.
        Peritendinous => "peritendinous",
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

/// The result of planning one frame. Serialises to the documented JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct NeedlePlan {
    /// `"ok"` or `"no_safe_path"`.
    pub status: PlanStatus,
    /// Why there is no path (null when ok).
    pub reason: Option<String>,
    /// Skin entry point.
    pub entry: Option<PlanPoint>,
    /// Target.
    pub target: Option<PlanPoint>,
    /// Angle between needle and skin line, degrees.
    pub angle_deg: Option<f64>,
    /// Target depth below the transducer face, mm; along the beam for a fan (from the near
    /// arc, where the probe face is).
    pub depth_mm: Option<f64>,
    /// Needle path length from entry to target, mm.
    pub length_mm: Option<f64>,
    /// Smallest distance from a forbidden structure along the checked path, mm; `null` when
    /// there is no forbidden structure in the frame (no sentinel value).
    pub clearance_mm: Option<f64>,
    /// `"joint_space"`, `"effusion"`, `"peritendinous"` or `"user"`.
    pub target_kind: Option<TargetKind>,
    /// `"left"` or `"right"`: the side of the target the needle enters from.
    pub side: Option<Side>,
    /// True when the frame had no usable calibration and a spacing was assumed.
    pub calibration_assumed: bool,
}

impl NeedlePlan {
    fn none(
        reason: impl Into<String>,
        target: Option<PlanPoint>,
        kind: Option<TargetKind>,
        assumed: bool,
    ) -> NeedlePlan {
        NeedlePlan {
            status: PlanStatus::NoSafePath,
            reason: Some(reason.into()),
            entry: None,
            target,
            angle_deg: None,
            depth_mm: target.map(|t| t.mm[1]),
            length_mm: None,
            clearance_mm: None,
            target_kind: kind,
            side: None,
            calibration_assumed: assumed,
        }
    }

    /// Whether a path was found.
    pub fn is_ok(&self) -> bool {
        self.status == PlanStatus::Ok
    }
}

/// Exact squared Euclidean distance transform along one line (Felzenszwalb & Huttenlocher).
fn edt_1d(f: &[f64], out: &mut [f64], v: &mut [usize], z: &mut [f64]) {
    let n = f.len();
    let mut k = 0usize;
    v[0] = 0;
    z[0] = f64::NEG_INFINITY;
    z[1] = f64::INFINITY;
    for q in 1..n {
        loop {
            let p = v[k];
            let s =
                ((f[q] + (q * q) as f64) - (f[p] + (p * p) as f64)) / (2.0 * (q as f64 - p as f64));
            if s <= z[k] && k > 0 {
                k -= 1;
                continue;
            }
            if s <= z[k] {
                // k == 0 and the new parabola wins everywhere.
                v[0] = q;
                z[0] = f64::NEG_INFINITY;
                z[1] = f64::INFINITY;
                break;
            }
            k += 1;
            v[k] = q;
            z[k] = s;
            z[k + 1] = f64::INFINITY;
            break;
        }
    }
    k = 0;
    for (q, o) in out.iter_mut().enumerate() {
        while z[k + 1] < q as f64 {
            k += 1;
        }
        let p = v[k];
        *o = (q as f64 - p as f64).powi(2) + f[p];
    }
}

/// Distance in mm from each pixel to the nearest `true` pixel of `mask` (infinite if none).
/// Columns, then rows, each line in parallel (every line is the same 1-D transform whatever
/// the order, so the result does not depend on the thread count).
pub fn distance_mm(mask: &Array2<bool>, mm: (f64, f64)) -> Array2<f64> {
    let (h, w) = mask.dim();
    const BIG: f64 = 1e20;
    if h == 0 || w == 0 {
        return Array2::from_elem((h, w), f64::INFINITY);
    }
    // Scratch for one line of length n: parabola indices, boundaries, input, output.
    let scratch = |n: usize| {
        (
            vec![0usize; n],
            vec![0f64; n + 1],
            vec![0f64; n],
            vec![0f64; n],
        )
    };
    // Columns first (squared distances in rows², scaled to mm²), stored column-major; the
    // row pass divides by mm.0² so that it works in column units, then scales back.
    let mask = mask.as_standard_layout();
    let mask = mask.as_slice().unwrap_or(&[]);
    let mut cols = vec![0f64; w * h];
    cols.par_chunks_mut(h).enumerate().for_each_init(
        || scratch(h),
        |(v, z, f, out), (x, col)| {
            for y in 0..h {
                f[y] = if mask[y * w + x] { 0.0 } else { BIG };
            }
            edt_1d(f, out, v, z);
            for (c, &o) in col.iter_mut().zip(out.iter()) {
                *c = if o >= BIG / 2.0 { BIG } else { o * mm.1 * mm.1 };
            }
        },
    );
    let sx2 = mm.0 * mm.0;
    let mut d = vec![0f64; h * w];
    d.par_chunks_mut(w).enumerate().for_each_init(
        || scratch(w),
        |(v, z, f, out), (y, row)| {
            for x in 0..w {
                f[x] = cols[x * h + y] / sx2;
            }
            edt_1d(f, out, v, z);
            for (d, &o) in row.iter_mut().zip(out.iter()) {
                *d = if o >= BIG / (2.0 * sx2) {
                    f64::INFINITY
                } else {
                    (o * sx2).sqrt()
                };
            }
        },
    );
    Array2::from_shape_vec((h, w), d).unwrap_or_else(|_| Array2::from_elem((h, w), f64::INFINITY))
}

/// What a needle must keep clear of (the labels forbidden by default: bone, shadow, vessel,
/// nerve) and the distance to it in mm.
fn obstacles(seg: &Segmentation, mm: (f64, f64)) -> (Array2<bool>, Array2<f64>) {
    let forbidden = seg
        .labels
        .mapv(|l| Label::from_code(l).is_some_and(Label::forbidden_by_default));
    let dist = distance_mm(&forbidden, mm);
    (forbidden, dist)
}

struct Geometry<'a> {
    frame: &'a Frame,
    mm: (f64, f64),
    top_row: f64,
    assumed: bool,
}

impl<'a> Geometry<'a> {
    /// The frame's calibration, or the assumed spacing (flagged) where it has none.
    fn new(frame: &'a Frame) -> Self {
        let mm = frame.calibration.mm_per_px();
        Geometry {
            frame,
            mm: mm.unwrap_or((ASSUMED_MM_PER_PX, ASSUMED_MM_PER_PX)),
            top_row: frame.region.bounds.y0 as f64,
            assumed: mm.is_none(),
        }
    }
    fn to_mm(&self, x: f64, y: f64) -> [f64; 2] {
        match self.frame.calibration.px_to_mm(x, y, self.top_row) {
            Some((a, b)) => [a, b],
            None => [
                (x - self.frame.region.bounds.x0 as f64) * self.mm.0,
                (y - self.top_row) * self.mm.1,
            ],
        }
    }
    fn point(&self, x: f64, y: f64) -> PlanPoint {
        PlanPoint {
            px: [x, y],
            mm: self.to_mm(x, y),
        }
    }
    fn mm_to_px(&self, xm: f64, ym: f64) -> (f64, f64) {
        match self.frame.calibration.mm_to_px(xm, ym, self.top_row) {
            Some(p) => p,
            None => (
                xm / self.mm.0 + self.frame.region.bounds.x0 as f64,
                ym / self.mm.1 + self.top_row,
            ),
        }
    }
}

/// The pixels of the 4-connected components of `pixels` whose depth extent reaches
/// `min_rows`.
fn deep_enough(
    pixels: &[(usize, usize)],
    dim: (usize, usize),
    min_rows: f64,
) -> Vec<(usize, usize)> {
    let mut mask = Array2::from_elem(dim, false);
    for &p in pixels {
        mask[p] = true;
    }
    crate::segment::components::components(&mask)
        .into_iter()
        .filter(|c| c.extent().0 as f64 >= min_rows)
        .flat_map(|c| c.pixels)
        .collect()
}

/// Chooses the target: the joint space, an effusion's deepest safe point, or peritendinous.
fn auto_target(
    seg: &Segmentation,
    forbidden_dist: &Array2<f64>,
    margin_mm: f64,
    mm: (f64, f64),
) -> Option<((f64, f64), TargetKind)> {
    let labels = &seg.labels;
    let (h, w) = labels.dim();
    let bone_cols: Vec<bool> = (0..w)
        .map(|x| (0..h).any(|y| labels[[y, x]] == Label::Bone.code()))
        .collect();
    // Joint space: label 4 in columns without bone, lying between bone columns on both sides.
    let first_bone = bone_cols.iter().position(|b| *b);
    let last_bone = bone_cols.iter().rposition(|b| *b);
    let mut joint: Vec<(usize, usize)> = Vec::new();
    let mut effusion: Vec<(usize, usize)> = Vec::new();
    for ((y, x), l) in labels.indexed_iter() {
        if *l != Label::Joint.code() {
            continue;
        }
        let between = matches!((first_bone, last_bone), (Some(a), Some(b)) if x > a && x < b);
        if !bone_cols[x] && between {
            joint.push((y, x));
        } else {
            effusion.push((y, x));
        }
    }
    if !joint.is_empty() {
        let n = joint.len() as f64;
        let cy = joint.iter().map(|p| p.0 as f64).sum::<f64>() / n;
        let cx = joint.iter().map(|p| p.1 as f64).sum::<f64>() / n;
        // Snap to the nearest joint pixel (the centroid of a curved recess may lie outside it).
        let best = joint.iter().min_by(|a, b| {
            let da =
                (a.0 as f64 - cy).powi(2) * mm.1 * mm.1 + (a.1 as f64 - cx).powi(2) * mm.0 * mm.0;
            let db =
                (b.0 as f64 - cy).powi(2) * mm.1 * mm.1 + (b.1 as f64 - cx).powi(2) * mm.0 * mm.0;
            da.total_cmp(&db)
        })?;
        return Some(((best.1 as f64, best.0 as f64), TargetKind::JointSpace));
    }
    // Only collections deep enough to hold a needle tip are targets: a thin film of fluid
    // next to bone is not (see `EFFUSION_MIN_DEPTH_MM`).
    let effusion = deep_enough(&effusion, (h, w), EFFUSION_MIN_DEPTH_MM / mm.1);
    if !effusion.is_empty() {
        // The deepest effusion pixel that keeps the margin from bone, shadow and vessels; else
        // the one with the most clearance.
        let safe = effusion
            .iter()
            .filter(|(y, x)| forbidden_dist[[*y, *x]] >= margin_mm)
            .max_by_key(|(y, _)| *y);
        let best = safe.or_else(|| {
            effusion
                .iter()
                .max_by(|a, b| forbidden_dist[[a.0, a.1]].total_cmp(&forbidden_dist[[b.0, b.1]]))
        })?;
        return Some(((best.1 as f64, best.0 as f64), TargetKind::Effusion));
    }
    let tendon: Vec<(usize, usize)> = labels
        .indexed_iter()
        .filter(|(_, l)| **l == Label::Tendon.code())
        .map(|(p, _)| p)
        .collect();
    if !tendon.is_empty() {
        let cx =
            (tendon.iter().map(|p| p.1 as f64).sum::<f64>() / tendon.len() as f64).round() as usize;
        let top = tendon.iter().filter(|p| p.1 == cx).map(|p| p.0).min()?;
        let y = top as f64 - PERITENDINOUS_MM / mm.1;
        return Some(((cx as f64, y.max(0.0)), TargetKind::Peritendinous));
    }
    None
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
    drop_fan_sides(line, frame)
}

/// Steepest top edge that can be skin, rows per column: an arc's tangent at a fan's corner
/// (up to 45° from horizontal for the widest phased arrays); a fan's straight sides are
/// steeper.
const SKIN_MAX_SLOPE: f64 = 1.0;
/// Columns either side over which that slope is measured.
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

/// Plans a needle path for one segmented frame.
pub fn plan(frame: &Frame, seg: &Segmentation, params: &PlanParams) -> NeedlePlan {
    let mut p = plan_frame(frame, seg, params);
    beam_depth(frame, &mut p);
    p
}

/// For a fan, the target's depth is measured along its beam from the near arc (the probe
/// face), not straight down from the top row.
fn beam_depth(frame: &Frame, p: &mut NeedlePlan) {
    let (Some(fan), Some(t)) = (frame.region.fan, p.target) else {
        return;
    };
    let mm = frame
        .calibration
        .mm_per_px()
        .unwrap_or((ASSUMED_MM_PER_PX, ASSUMED_MM_PER_PX));
    let (dx, dy) = (t.px[0] - fan.apex[0], t.px[1] - fan.apex[1]);
    let r_mm = (dx * mm.0).hypot(dy * mm.1);
    let near_mm = fan.r_near * r_mm / dx.hypot(dy).max(1e-9);
    p.depth_mm = Some(r_mm - near_mm);
}

fn plan_frame(frame: &Frame, seg: &Segmentation, params: &PlanParams) -> NeedlePlan {
    // Settings, frame or label map that break the invariants get no path, never a panic.
    if let Err(e) = params.validate() {
        return NeedlePlan::none(e.to_string(), None, None, false);
    }
    // The layout is what planning indexes by; the pixel values are not read here.
    if let Err(e) = frame.check_layout() {
        return NeedlePlan::none(e.to_string(), None, None, false);
    }
    if seg.labels.dim() != frame.intensity.dim() {
        return NeedlePlan::none(
            format!(
                "the label map ({:?}) is not the frame's size ({}x{})",
                seg.labels.dim(),
                frame.width(),
                frame.height()
            ),
            None,
            None,
            false,
        );
    }
    let g = Geometry::new(frame);
    let mm = g.mm;
    let (h, w) = seg.labels.dim();
    let (forbidden, dist) = obstacles(seg, mm);
    let (target_px, kind) = match params.target_mm {
        Some((xm, ym)) => (g.mm_to_px(xm, ym), TargetKind::User),
        None => match auto_target(seg, &dist, params.margin_mm, mm) {
            Some(t) => t,
            None => {
                return NeedlePlan::none(
                    "no target found: no joint space, effusion or tendon in the frame",
                    None,
                    None,
                    g.assumed,
                )
            }
        },
    };
    let (tx, ty) = target_px;
    let target = g.point(tx, ty);
    if tx < 0.0
        || ty < 0.0
        || tx >= w as f64
        || ty >= h as f64
        || !frame.region.contains(tx as usize, ty as usize)
    {
        return NeedlePlan::none(
            "the target lies outside the imaging region",
            Some(target),
            Some(kind),
            g.assumed,
        );
    }
    if forbidden[[ty as usize, tx as usize]] {
        return NeedlePlan::none(
            "the target lies in bone, acoustic shadow or a vessel",
            Some(target),
            Some(kind),
            g.assumed,
        );
    }
    let skin = skin_line(frame);
    let mut best: Option<(f64, NeedlePlan)> = None;
    let mut reasons = [0usize; 4]; // angle, outside, too close, crosses
    for (ex, ey) in skin
        .iter()
        .enumerate()
        .filter_map(|(x, y)| y.map(|y| (x, y)))
    {
        if (ex as f64 - tx).abs() < 1.0 {
            continue;
        }
        let (ex_f, ey_f) = (ex as f64, ey as f64);
        let e_mm = g.to_mm(ex_f, ey_f);
        let (dx, dy) = (target.mm[0] - e_mm[0], target.mm[1] - e_mm[1]);
        if dy <= 0.0 {
            reasons[0] += 1;
            continue;
        }
        // Skin line direction at the entry (the region's top edge), in mm.
        let (xa, xb) = (ex.saturating_sub(3), (ex + 3).min(w - 1));
        let skin_dir = match (skin[xa], skin[xb]) {
            (Some(ya), Some(yb)) if xb > xa => {
                ((xb - xa) as f64 * mm.0, (yb as f64 - ya as f64) * mm.1)
            }
            _ => (1.0, 0.0),
        };
        let len = (dx * dx + dy * dy).sqrt();
        let cos = ((dx * skin_dir.0 + dy * skin_dir.1)
            / (len * (skin_dir.0.powi(2) + skin_dir.1.powi(2)).sqrt()))
        .abs();
        let angle = cos.clamp(0.0, 1.0).acos().to_degrees();
        if angle < params.min_angle_deg || angle > params.max_angle_deg {
            reasons[0] += 1;
            continue;
        }
        let steps = (len * SAMPLES_PER_MM).ceil() as usize;
        let mut clearance = f64::INFINITY;
        let mut ok = true;
        for k in 0..=steps {
            let t = k as f64 / steps as f64;
            let (px, py) = (ex_f + t * (tx - ex_f), ey_f + t * (ty - ey_f));
            let (xi, yi) = (px.round() as usize, py.round() as usize);
            if xi >= w || yi >= h || !frame.region.contains(xi, yi) {
                ok = false;
                reasons[1] += 1;
                break;
            }
            if forbidden[[yi, xi]] {
                ok = false;
                reasons[3] += 1;
                break;
            }
            let to_target = (1.0 - t) * len;
            if to_target > approach(params) {
                clearance = clearance.min(dist[[yi, xi]]);
            }
        }
        if !ok {
            continue;
        }
        if clearance < params.margin_mm {
            reasons[2] += 1;
            continue;
        }
        let cost = len / LENGTH_SCALE_MM
            + (angle - params.preferred_angle_deg).abs() / ANGLE_SCALE_DEG
            + CLEARANCE_SCALE_MM / clearance.max(1e-3);
        if best.as_ref().is_none_or(|(c, _)| cost < *c) {
            let plan = NeedlePlan {
                status: PlanStatus::Ok,
                reason: None,
                entry: Some(g.point(ex_f, ey_f)),
                target: Some(target),
                angle_deg: Some(angle),
                depth_mm: Some(target.mm[1]),
                length_mm: Some(len),
                clearance_mm: clearance.is_finite().then_some(clearance),
                target_kind: Some(kind),
                side: Some(if ex_f < tx { Side::Left } else { Side::Right }),
                calibration_assumed: g.assumed,
            };
            best = Some((cost, plan));
        }
    }
    match best {
        Some((_, p)) => p,
        None => {
            let why = if reasons.iter().sum::<usize>() == 0 {
                "no skin entry point on either side of the target".to_string()
            } else {
                format!(
                    "no entry satisfies the constraints ({} outside {}–{}°, {} leave the image, {} cross bone/shadow/vessel, {} closer than {} mm)",
                    reasons[0], params.min_angle_deg, params.max_angle_deg, reasons[1], reasons[3], reasons[2], params.margin_mm
                )
            };
            NeedlePlan::none(why, Some(target), Some(kind), g.assumed)
        }
    }
}

/// Temporal smoothing of plans over a cine, so that the suggestion does not jitter: the target
/// follows an exponential moving average (in px); the entry stays where it was while it still
/// gives a safe path to the smoothed target (else it moves by the same average, else to the raw
/// plan's). A change of status, target kind or side resets it. Every smoothed path is
/// re-checked against the frame's labels.
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
        let (Some(e), Some(t)) = (raw.entry, raw.target) else {
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
        let mut p = params.clone();
        p.target_mm = None;
        let mix = |a: [f64; 2], b: [f64; 2]| {
            [
                a[0] + SMOOTHING_ALPHA * (b[0] - a[0]),
                a[1] + SMOOTHING_ALPHA * (b[1] - a[1]),
            ]
        };
        if let Some((pe, pt)) = self.state {
            // Even when this frame's best entry is on the other side, the previous one is kept
            // if it is still safe: near-equal costs must not flip the suggestion.
            let st = mix(pt, t.px);
            let g = Geometry::new(frame);
            let (forbidden, dist) = obstacles(seg, g.mm);
            // Keep the previous entry while it still gives a safe path (hysteresis: the
            // exhaustive search may flip between near-equal entries), else move it.
            for entry in [pe, self.on_skin(frame, mix(pe, e.px))] {
                if let Some(plan) = check_path(&g, (&forbidden, &dist), entry, st, raw, &p) {
                    self.state = Some((entry, st));
                    return plan;
                }
            }
        }
        self.state = Some((e.px, t.px));
        raw.clone()
    }

    fn on_skin(&self, frame: &Frame, at: [f64; 2]) -> [f64; 2] {
        let skin = skin_line(frame);
        let x = at[0].round().clamp(0.0, (frame.width().max(1) - 1) as f64) as usize;
        [x as f64, skin[x].map(|y| y as f64).unwrap_or(at[1])]
    }
}

/// Re-evaluates a given entry → target path under the constraints; `None` if unsafe.
fn check_path(
    g: &Geometry<'_>,
    (forbidden, dist): (&Array2<bool>, &Array2<f64>),
    entry: [f64; 2],
    target: [f64; 2],
    raw: &NeedlePlan,
    params: &PlanParams,
) -> Option<NeedlePlan> {
    let frame = g.frame;
    let (h, w) = forbidden.dim();
    let (e, t) = (g.point(entry[0], entry[1]), g.point(target[0], target[1]));
    if !frame
        .region
        .contains(target[0] as usize, target[1] as usize)
        || forbidden[[target[1] as usize, target[0] as usize]]
    {
        return None;
    }
    let (dx, dy) = (t.mm[0] - e.mm[0], t.mm[1] - e.mm[1]);
    let len = (dx * dx + dy * dy).sqrt();
    if dy <= 0.0 || len == 0.0 {
        return None;
    }
    let angle = (dy / len).asin().to_degrees();
    if angle < params.min_angle_deg || angle > params.max_angle_deg {
        return None;
    }
    let steps = (len * SAMPLES_PER_MM).ceil() as usize;
    let mut clearance = f64::INFINITY;
    for k in 0..=steps {
        let s = k as f64 / steps as f64;
        let (px, py) = (
            entry[0] + s * (target[0] - entry[0]),
            entry[1] + s * (target[1] - entry[1]),
        );
        let (xi, yi) = (px.round() as usize, py.round() as usize);
        if xi >= w || yi >= h || !frame.region.contains(xi, yi) || forbidden[[yi, xi]] {
            return None;
        }
        if (1.0 - s) * len > approach(params) {
            clearance = clearance.min(dist[[yi, xi]]);
        }
    }
    if clearance < params.margin_mm {
        return None;
    }
    let mut p = NeedlePlan {
        status: PlanStatus::Ok,
        reason: None,
        entry: Some(e),
        target: Some(t),
        angle_deg: Some(angle),
        depth_mm: Some(t.mm[1]),
        length_mm: Some(len),
        clearance_mm: clearance.is_finite().then_some(clearance),
        target_kind: raw.target_kind,
        side: Some(if entry[0] < target[0] {
            Side::Left
        } else {
            Side::Right
        }),
        calibration_assumed: g.assumed,
    };
    beam_depth(frame, &mut p);
    Some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance_transform_is_euclidean_in_mm() {
        let mut m = Array2::from_elem((21, 31), false);
        m[[10, 15]] = true;
        let d = distance_mm(&m, (0.1, 0.2));
        assert!((d[[10, 15]]).abs() < 1e-12);
        assert!((d[[10, 25]] - 1.0).abs() < 1e-9, "{}", d[[10, 25]]);
        assert!((d[[15, 15]] - 1.0).abs() < 1e-9);
        assert!((d[[13, 19]] - (0.4f64.powi(2) + 0.6f64.powi(2)).sqrt()).abs() < 1e-9);
        let empty = distance_mm(&Array2::from_elem((4, 4), false), (0.1, 0.1));
        assert!(empty.iter().all(|v| v.is_infinite()));
    }

    /// Against brute force on a scattered mask, non-square pixels, more lines than threads.
    #[test]
    fn distance_transform_matches_brute_force() {
        let (h, w, mm) = (37, 53, (0.15, 0.1));
        let m = Array2::from_shape_fn((h, w), |(y, x)| (x * 13 + y * 7) % 97 == 0);
        let d = distance_mm(&m, mm);
        let points: Vec<(usize, usize)> = m
            .indexed_iter()
            .filter(|(_, v)| **v)
            .map(|(p, _)| p)
            .collect();
        for ((y, x), got) in d.indexed_iter() {
            let want = points
                .iter()
                .map(|&(py, px)| {
                    ((px as f64 - x as f64) * mm.0).hypot((py as f64 - y as f64) * mm.1)
                })
                .fold(f64::INFINITY, f64::min);
            assert!((got - want).abs() < 1e-9, "({x}, {y}): {got} vs {want}");
        }
    }
}
