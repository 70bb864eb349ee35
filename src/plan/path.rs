//! The one path check, used by the planner, the cine smoother and the evaluation: the exact
//! distance from a straight needle to every structure it must keep clear of.
//!
//! A labelled pixel is the closed square it covers (centre at integer coordinates, side one
//! pixel, scaled to mm by the spacing), so a structure is a union of squares and the needle a
//! segment. The distance between the two is computed exactly (segment against each square of
//! the structure's outline), not at samples along the path. A path is safe when, for every
//! structure, that distance is at least the structure's margin and above zero (a margin of 0
//! forbids crossing or touching only).
//!
//! Sampling is used only to *screen* candidate entries quickly: a sample whose distance to the
//! nearest pixel centre is below the margin proves a violation (the squares are at least as
//! close as their centres), so screening never drops a path the exact check would accept.
//!
//! The final approach: for a target between obstacles (a joint space between two bone ends),
//! the last `approach_mm` of the path need only not cross the structures marked exempt (bone
//! and shadow); vessels, nerves and tendons keep their margins to the tip.

use ndarray::Array2;

use super::edt::squared_distance_mm2;
use crate::label::Label;

/// What the needle must keep clear of, and how far.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rule {
    /// The structure.
    pub label: Label,
    /// Distance to keep, mm (0: must only not cross).
    pub margin_mm: f64,
    /// Whether the final approach to a joint target exempts it from its margin.
    pub exempt_near_joint: bool,
    /// Whether breaking the margin makes the path unsafe; a soft structure is only measured
    /// and reported (a tendon on the way to a joint), and screening counts its crossings.
    pub hard: bool,
}

/// One structure present in the frame.
#[derive(Debug)]
struct Structure {
    rule: Rule,
    /// Pixels on the outline (a 4-neighbour outside the structure or the image), as
    /// (column, row) centres in mm.
    outline: Vec<[f64; 2]>,
}

/// A distance map shared by the structures with the same margin.
#[derive(Debug)]
struct Field {
    margin_mm: f64,
    /// Whether a structure of the field is exempt near a joint target (screening then skips
    /// the field on the final approach; the exact check judges the others there).
    exempt: bool,
    /// Squared distance from each pixel to the nearest pixel centre of its structures, mm².
    dist2: Array2<f64>,
    /// The margin squared, mm².
    margin2: f64,
}

/// The structures of one frame's label map with their rules, ready for path checks.
#[derive(Debug)]
pub struct Obstacles {
    mm: (f64, f64),
    labels: Array2<u8>,
    structures: Vec<Structure>,
    fields: Vec<Field>,
    /// Per pixel: `HARD` if a hard structure covers it, `SOFT` if a soft one does.
    occupancy: Array2<u8>,
}

const HARD: u8 = 1;
const SOFT: u8 = 2;

/// The result of the exact check of one path.
#[derive(Debug, Clone, PartialEq)]
pub struct PathCheck {
    /// Exact distance from the whole path (entry to target) to each structure present, mm,
    /// in the order of the rules.
    pub clearances: Vec<(Label, f64)>,
    /// The smallest of those over the hard structures (none present: `None`).
    pub nearest_hard_mm: Option<f64>,
    /// Why the path is unsafe, if it is.
    pub violation: Option<String>,
}

impl PathCheck {
    /// No violation.
    pub fn is_safe(&self) -> bool {
        self.violation.is_none()
    }
}

impl Obstacles {
    /// Builds the structures of `labels` named by `rules` (those absent from the frame are
    /// left out), at `mm` (x, y) mm per pixel.
    pub fn new(labels: &Array2<u8>, mm: (f64, f64), rules: &[Rule]) -> Obstacles {
        let (h, w) = labels.dim();
        // Which rule claims each label code (the first that names it).
        let mut rule_of = [None::<usize>; 256];
        for (i, r) in rules.iter().enumerate().rev() {
            rule_of[r.label.code() as usize] = Some(i);
        }
        // Which distance map each rule feeds: structures with the same margin share one.
        let mut fields: Vec<Field> = Vec::new();
        let mut field_of = vec![None::<usize>; rules.len()];
        for (i, r) in rules.iter().enumerate() {
            if !(r.hard && r.margin_mm > 0.0) {
                continue;
            }
            let f = match fields.iter().position(|f| f.margin_mm == r.margin_mm) {
                Some(f) => f,
                None => {
                    fields.push(Field {
                        margin_mm: r.margin_mm,
                        exempt: false,
                        dist2: Array2::zeros((0, 0)),
                        margin2: r.margin_mm * r.margin_mm,
                    });
                    fields.len() - 1
                }
            };
            fields[f].exempt |= r.exempt_near_joint;
            field_of[i] = Some(f);
        }
        // One pass over the labels, row by row: occupancy, the fields' masks, each structure's
        // outline.
        let standard = labels.as_standard_layout();
        let flat = standard.as_slice().unwrap_or(&[]);
        let mut occupancy = vec![0u8; h * w];
        let mut masks = vec![vec![false; h * w]; fields.len()];
        let mut outlines: Vec<Vec<[f64; 2]>> = vec![Vec::new(); rules.len()];
        let mut present = vec![false; rules.len()];
        let mut filled = vec![false; fields.len()];
        for y in 0..h {
            let row = &flat[y * w..(y + 1) * w];
            let above = (y > 0).then(|| &flat[(y - 1) * w..y * w]);
            let below = (y + 1 < h).then(|| &flat[(y + 1) * w..(y + 2) * w]);
            for (x, &l) in row.iter().enumerate() {
                let Some(i) = rule_of[l as usize] else {
                    continue;
                };
                present[i] = true;
                occupancy[y * w + x] = if rules[i].hard { HARD } else { SOFT };
                if let Some(f) = field_of[i] {
                    masks[f][y * w + x] = true;
                    filled[f] = true;
                }
                let interior = x > 0
                    && x + 1 < w
                    && row[x - 1] == l
                    && row[x + 1] == l
                    && above.is_some_and(|r| r[x] == l)
                    && below.is_some_and(|r| r[x] == l);
                if !interior {
                    outlines[i].push([x as f64 * mm.0, y as f64 * mm.1]);
                }
            }
        }
        let occupancy =
            Array2::from_shape_vec((h, w), occupancy).unwrap_or_else(|_| Array2::zeros((h, w)));
        for ((f, mask), filled) in fields.iter_mut().zip(masks).zip(filled) {
            f.dist2 = if filled {
                let mask = Array2::from_shape_vec((h, w), mask)
                    .unwrap_or_else(|_| Array2::from_elem((h, w), false));
                squared_distance_mm2(&mask, mm)
            } else {
                Array2::from_elem((h, w), f64::INFINITY)
            };
        }
        let structures = rules
            .iter()
            .zip(outlines)
            .zip(&present)
            .filter(|(_, p)| **p)
            .map(|((rule, outline), _)| Structure {
                rule: *rule,
                outline,
            })
            .collect();
        Obstacles {
            mm,
            labels: labels.clone(),
            structures,
            fields,
            occupancy,
        }
    }

    /// Whether there is no structure to avoid.
    pub fn is_empty(&self) -> bool {
        self.structures.is_empty()
    }

    /// The hard structure at pixel (column, row), if any.
    pub fn at(&self, x: usize, y: usize) -> Option<Label> {
        if self.occupancy.get((y, x)).copied().unwrap_or(0) & HARD == 0 {
            return None;
        }
        self.structures
            .iter()
            .filter(|s| s.rule.hard)
            .find(|s| self.labels.get((y, x)) == Some(&s.rule.label.code()))
            .map(|s| s.rule.label)
    }

    /// How far a point is from breaking the margins, mm: the smallest (distance to the nearest
    /// pixel centre − margin) over the structures with a margin (infinite if there are none).
    /// Negative where some margin is not kept. A screening measure, not the exact one.
    pub fn slack_at(&self, x: usize, y: usize) -> f64 {
        self.fields
            .iter()
            .map(|f| f.dist2.get((y, x)).copied().unwrap_or(0.0).sqrt() - f.margin_mm)
            .fold(f64::INFINITY, f64::min)
    }

    /// Screens the path `entry` → `target` (full-frame px) at samples `step_mm` apart. Returns
    /// `None` when a sample proves a violation, else the smallest sampled distance to the hard
    /// structures with a margin (where their margin applies; infinite if none), the clearance
    /// the planner's cost ranks by, and whether a sample lies in a soft structure.
    pub fn screen(
        &self,
        entry: [f64; 2],
        target: [f64; 2],
        approach_mm: f64,
        step_mm: f64,
    ) -> Option<(f64, bool)> {
        let len = self.length_mm(entry, target);
        let steps = (len / step_mm.max(1e-3)).ceil().max(1.0) as usize;
        // Squared distances until the end (the root is monotone).
        let mut clearance2 = f64::INFINITY;
        let mut soft = false;
        for k in 0..=steps {
            let s = k as f64 / steps as f64;
            let (x, y) = (
                entry[0] + s * (target[0] - entry[0]),
                entry[1] + s * (target[1] - entry[1]),
            );
            let (xi, yi) = (x.round(), y.round());
            if xi < 0.0 || yi < 0.0 {
                continue;
            }
            let (xi, yi) = (xi as usize, yi as usize);
            let o = self.occupancy.get((yi, xi)).copied().unwrap_or(0);
            if o & HARD != 0 {
                return None;
            }
            soft |= o & SOFT != 0;
            let in_approach = (1.0 - s) * len < approach_mm;
            for f in &self.fields {
                if f.exempt && in_approach {
                    continue;
                }
                let d2 = f.dist2.get((yi, xi)).copied().unwrap_or(f64::INFINITY);
                if d2 < f.margin2 {
                    return None;
                }
                clearance2 = clearance2.min(d2);
            }
        }
        Some((clearance2.sqrt(), soft))
    }

    /// Length of a path in mm.
    pub fn length_mm(&self, a: [f64; 2], b: [f64; 2]) -> f64 {
        ((b[0] - a[0]) * self.mm.0).hypot((b[1] - a[1]) * self.mm.1)
    }

    /// The exact check of the path `entry` → `target` (full-frame px), the last
    /// `approach_mm` of it exempt from the margins of the structures marked so (they must
    /// still not be crossed).
    pub fn check(&self, entry: [f64; 2], target: [f64; 2], approach_mm: f64) -> PathCheck {
        let to_mm = |p: [f64; 2]| [p[0] * self.mm.0, p[1] * self.mm.1];
        let (a, b) = (to_mm(entry), to_mm(target));
        let len = (b[0] - a[0]).hypot(b[1] - a[1]);
        let approach = approach_mm.clamp(0.0, len);
        // The start of the final approach.
        let p = if len > 0.0 {
            let r = 1.0 - approach / len;
            [a[0] + r * (b[0] - a[0]), a[1] + r * (b[1] - a[1])]
        } else {
            a
        };
        let half = (self.mm.0 / 2.0, self.mm.1 / 2.0);
        let mut clearances = Vec::with_capacity(self.structures.len());
        let mut violation = None;
        let mut nearest_hard = None;
        for s in &self.structures {
            let inside = |q: [f64; 2]| {
                let (x, y) = ((q[0] / self.mm.0).round(), (q[1] / self.mm.1).round());
                x >= 0.0
                    && y >= 0.0
                    && self.labels.get((y as usize, x as usize)) == Some(&s.rule.label.code())
            };
            let dist = |u: [f64; 2], v: [f64; 2]| {
                if inside(u) || inside(v) {
                    return 0.0;
                }
                // A square is no nearer than its centre less half its diagonal: most squares
                // are ruled out by that bound without the exact computation.
                let half_diagonal = half.0.hypot(half.1);
                let mut best = f64::INFINITY;
                for c in &s.outline {
                    if point_segment_distance(*c, u, v) - half_diagonal >= best {
                        continue;
                    }
                    best = best.min(segment_box_distance(u, v, *c, half));
                }
                best
            };
            let margin = s.rule.margin_mm;
            let (whole, kept) = if s.rule.exempt_near_joint && approach > 0.0 {
                let (before, last) = (dist(a, p), dist(p, b));
                if s.rule.hard && last <= 0.0 && violation.is_none() {
                    violation = Some(format!(
                        "crosses {} on the final approach",
                        s.rule.label.name()
                    ));
                }
                (before.min(last), before)
            } else {
                let d = dist(a, b);
                (d, d)
            };
            if s.rule.hard && violation.is_none() && (kept < margin || kept <= 0.0) {
                violation = Some(if kept <= 0.0 {
                    format!("crosses {}", s.rule.label.name())
                } else {
                    format!(
                        "passes {:.2} mm from {} (margin {} mm)",
                        kept,
                        s.rule.label.name(),
                        margin
                    )
                });
            }
            clearances.push((s.rule.label, whole));
            if s.rule.hard {
                nearest_hard = Some(nearest_hard.map_or(whole, |n: f64| n.min(whole)));
            }
        }
        PathCheck {
            clearances,
            nearest_hard_mm: nearest_hard,
            violation,
        }
    }
}

/// The rules a path is judged by against truth labels: it must not cross bone, shadow or a
/// vessel, and must keep `nerve_margin_mm` from a nerve.
pub fn truth_rules(nerve_margin_mm: f64) -> Vec<Rule> {
    [
        (Label::Bone, 0.0),
        (Label::Shadow, 0.0),
        (Label::Vessel, 0.0),
        (Label::Nerve, nerve_margin_mm),
    ]
    .into_iter()
    .map(|(label, margin_mm)| Rule {
        label,
        margin_mm,
        exempt_near_joint: false,
        hard: true,
    })
    .collect()
}

/// Exact distance between the segment `a`–`b` and the closed axis-aligned box of centre `c`
/// and half sizes `half` (all in mm); 0 when they meet.
pub fn segment_box_distance(a: [f64; 2], b: [f64; 2], c: [f64; 2], half: (f64, f64)) -> f64 {
    let a = [a[0] - c[0], a[1] - c[1]];
    let b = [b[0] - c[0], b[1] - c[1]];
    if segment_meets_box(a, b, half) {
        return 0.0;
    }
    // Two disjoint convex shapes are closest at a vertex of one of them.
    let point_box = |p: [f64; 2]| {
        let dx = (p[0].abs() - half.0).max(0.0);
        let dy = (p[1].abs() - half.1).max(0.0);
        dx.hypot(dy)
    };
    let mut d = point_box(a).min(point_box(b));
    for (sx, sy) in [(-1.0, -1.0), (-1.0, 1.0), (1.0, -1.0), (1.0, 1.0)] {
        d = d.min(point_segment_distance([sx * half.0, sy * half.1], a, b));
    }
    d
}

/// Distance from `p` to the segment `a`–`b`.
pub fn point_segment_distance(p: [f64; 2], a: [f64; 2], b: [f64; 2]) -> f64 {
    let (dx, dy) = (b[0] - a[0], b[1] - a[1]);
    let l2 = dx * dx + dy * dy;
    let t = if l2 > 0.0 {
        (((p[0] - a[0]) * dx + (p[1] - a[1]) * dy) / l2).clamp(0.0, 1.0)
    } else {
        0.0
    };
    (a[0] + t * dx - p[0]).hypot(a[1] + t * dy - p[1])
}

/// Whether the segment `a`–`b` meets the closed box [−hx, hx] × [−hy, hy] (Liang–Barsky
/// clipping).
fn segment_meets_box(a: [f64; 2], b: [f64; 2], half: (f64, f64)) -> bool {
    let d = [b[0] - a[0], b[1] - a[1]];
    let (mut t0, mut t1) = (0.0f64, 1.0f64);
    for (axis, h) in [(0, half.0), (1, half.1)] {
        for (p, q) in [(-d[axis], a[axis] + h), (d[axis], h - a[axis])] {
            if p == 0.0 {
                if q < 0.0 {
                    return false;
                }
            } else {
                let r = q / p;
                if p < 0.0 {
                    t0 = t0.max(r);
                } else {
                    t1 = t1.min(r);
                }
                if t0 > t1 {
                    return false;
                }
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_box_distance_cases() {
        let h = (0.5, 0.5);
        // Crossing, touching a corner, passing above, ending short.
        assert_eq!(
            segment_box_distance([-2.0, 0.0], [2.0, 0.0], [0.0, 0.0], h),
            0.0
        );
        assert_eq!(
            segment_box_distance([-1.0, -1.0], [-0.5, -0.5], [0.0, 0.0], h),
            0.0
        );
        assert!((segment_box_distance([-2.0, 1.5], [2.0, 1.5], [0.0, 0.0], h) - 1.0).abs() < 1e-12);
        assert!(
            (segment_box_distance([-3.0, 0.0], [-2.0, 0.0], [0.0, 0.0], h) - 1.5).abs() < 1e-12
        );
        // A diagonal passing a corner: distance from (0.5, 0.5) to the line x + y = 2.
        let d = segment_box_distance([2.0, 0.0], [0.0, 2.0], [0.0, 0.0], h);
        assert!((d - 1.0 / 2f64.sqrt()).abs() < 1e-12, "{d}");
    }
}
