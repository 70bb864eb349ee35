//! Safety by construction, as a property: random obstacle maps, random targets and random
//! settings; every path the planner returns is judged by a brute-force distance computed here,
//! independently of the planner's own check (every obstacle pixel, not only outlines; the
//! distance to each pixel's square found by minimising along the needle, not from vertices).

use ndarray::Array2;
use sonoguide::frame::{Calibration, CalibrationSource, Frame};
use sonoguide::label::Label;
use sonoguide::plan::{check_path, plan, PlanParams, PlanSmoother, TargetKind};
use sonoguide::{Backend, Pipeline};

/// Random label maps tried.
const CASES: u64 = 160;
/// A returned path may come this much closer than its margin: floating-point rounding of the
/// two independent computations, far below a micrometre.
const ROUNDING_MM: f64 = 1e-6;

/// A small deterministic generator (xorshift), so that a failure names its case.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Distance from point `p` to the closed square of pixel (x, y), mm.
fn point_square(p: [f64; 2], x: usize, y: usize, mm: (f64, f64)) -> f64 {
    let (cx, cy) = (x as f64 * mm.0, y as f64 * mm.1);
    let dx = ((p[0] - cx).abs() - mm.0 / 2.0).max(0.0);
    let dy = ((p[1] - cy).abs() - mm.1 / 2.0).max(0.0);
    dx.hypot(dy)
}

/// Distance from the segment a–b (mm) to the square of pixel (x, y): the distance to a convex
/// set is convex along a line, so a golden-section search on the segment finds its minimum.
fn segment_square(a: [f64; 2], b: [f64; 2], x: usize, y: usize, mm: (f64, f64)) -> f64 {
    let at = |t: f64| {
        point_square(
            [a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1])],
            x,
            y,
            mm,
        )
    };
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    let g = (5f64.sqrt() - 1.0) / 2.0;
    for _ in 0..80 {
        let (m1, m2) = (hi - g * (hi - lo), lo + g * (hi - lo));
        if at(m1) <= at(m2) {
            hi = m2;
        } else {
            lo = m1;
        }
    }
    at((lo + hi) / 2.0).min(at(0.0)).min(at(1.0))
}

/// The brute-force distance from segment a–b (px) to every pixel labelled `label`, mm.
fn brute(labels: &Array2<u8>, label: Label, a: [f64; 2], b: [f64; 2], mm: (f64, f64)) -> f64 {
    let (a, b) = ([a[0] * mm.0, a[1] * mm.1], [b[0] * mm.0, b[1] * mm.1]);
    labels
        .indexed_iter()
        .filter(|(_, l)| **l == label.code())
        .map(|((y, x), _)| segment_square(a, b, x, y, mm))
        .fold(f64::INFINITY, f64::min)
}

/// A random map: blobs (discs and bars) of random labels on background.
fn random_labels(rng: &mut Rng, h: usize, w: usize) -> Array2<u8> {
    let mut l = Array2::<u8>::zeros((h, w));
    for _ in 0..3 + rng.below(8) {
        let code = [1u8, 2, 3, 4, 4, 5, 6][rng.below(7)];
        let (cx, cy) = (rng.uniform(0.0, w as f64), rng.uniform(10.0, h as f64));
        let (rx, ry) = (rng.uniform(2.0, 40.0), rng.uniform(2.0, 14.0));
        for y in 0..h {
            for x in 0..w {
                let (dx, dy) = ((x as f64 - cx) / rx, (y as f64 - cy) / ry);
                if dx * dx + dy * dy <= 1.0 {
                    l[[y, x]] = code;
                }
            }
        }
    }
    l
}

fn random_params(rng: &mut Rng, w: usize, h: usize, mm: f64) -> PlanParams {
    let mut p = PlanParams::default();
    p.margin_mm = rng.uniform(0.0, 3.0);
    p.shadow_margin_mm = rng.uniform(0.0, 3.0);
    p.vessel_margin_mm = rng.uniform(0.0, 4.0);
    p.nerve_margin_mm = rng.uniform(0.0, 4.0);
    p.min_angle_deg = rng.uniform(5.0, 30.0);
    p.max_angle_deg = rng.uniform(p.min_angle_deg, 70.0);
    p.preferred_angle_deg = rng.uniform(p.min_angle_deg, p.max_angle_deg);
    p.final_approach_mm = rng.uniform(0.0, 5.0);
    let mut kinds = vec![
        TargetKind::JointSpace,
        TargetKind::Effusion,
        TargetKind::Peritendinous,
        TargetKind::Intratendinous,
        TargetKind::Perineural,
    ];
    for i in (1..kinds.len()).rev() {
        kinds.swap(i, rng.below(i + 1));
    }
    kinds.truncate(1 + rng.below(kinds.len()));
    p.targets = kinds;
    if rng.below(3) == 0 {
        p.target_mm = Some((
            rng.uniform(0.0, w as f64 * mm),
            rng.uniform(0.0, h as f64 * mm),
        ));
    }
    p
}

#[test]
fn no_returned_path_breaks_a_margin_by_brute_force() {
    let (w, h, mm) = (160usize, 120usize, 0.2);
    let calibration = Calibration::Ok {
        mm_per_px_x: mm,
        mm_per_px_y: mm,
        reference_px: None,
        source: CalibrationSource::Given,
    };
    let frame = Frame::from_gray8(w, h, &vec![80u8; w * h], calibration).unwrap();
    let pipeline = Pipeline::builder().backend(Backend::Cpu).build().unwrap();
    let mut seg = pipeline.process(&frame).unwrap().segmentation;
    let mut rng = Rng(0x5eed_2026);
    let (mut ok, mut joint_ok) = (0, 0);
    for case in 0..CASES {
        seg.labels = random_labels(&mut rng, h, w);
        let params = random_params(&mut rng, w, h, mm);
        let p = plan(&frame, &seg, &params);
        if !p.is_ok() {
            assert!(p.reason.is_some(), "case {case}: a refusal says why");
            continue;
        }
        ok += 1;
        let (e, t) = (p.entry.unwrap().px, p.target.unwrap().px);
        let kind = p.target_kind.unwrap();
        let approach = p.final_approach_mm.unwrap_or(0.0);
        assert!(
            approach <= params.final_approach_mm + 1e-12,
            "case {case}: approach {approach} beyond the bound"
        );
        assert!(
            kind == TargetKind::JointSpace || approach == 0.0,
            "case {case}: only a joint target has a final approach ({kind})"
        );
        joint_ok += (approach > 0.0) as usize;
        // Where the final approach starts.
        let len_px = (t[0] - e[0]).hypot(t[1] - e[1]);
        let len_mm = ((t[0] - e[0]) * mm).hypot((t[1] - e[1]) * mm);
        let r = 1.0 - (approach / len_mm).min(1.0);
        let split = [e[0] + r * (t[0] - e[0]), e[1] + r * (t[1] - e[1])];
        assert!(len_px > 0.0);
        for (label, margin, exempt) in [
            (Label::Bone, params.margin_mm, true),
            (Label::Shadow, params.shadow_margin_mm, true),
            (Label::Vessel, params.vessel_margin_mm, false),
            (Label::Nerve, params.nerve_margin_mm, false),
        ] {
            let kept = if exempt && approach > 0.0 {
                let last = brute(&seg.labels, label, split, t, (mm, mm));
                assert!(last > 0.0, "case {case}: crosses {label:?} near the target");
                brute(&seg.labels, label, e, split, (mm, mm))
            } else {
                brute(&seg.labels, label, e, t, (mm, mm))
            };
            assert!(
                kept > 0.0 && kept >= margin - ROUNDING_MM,
                "case {case}: {label:?} at {kept} mm, margin {margin} ({params:?}, {p:?})"
            );
        }
        if matches!(kind, TargetKind::Peritendinous | TargetKind::Perineural) {
            let d = brute(&seg.labels, Label::Tendon, e, t, (mm, mm));
            assert!(d > 0.0, "case {case}: a {kind} path pierces a tendon");
        }
        // The public check accepts what the planner returned, with the same clearances.
        let again = check_path(&frame, &seg, &params, kind, e, t)
            .unwrap_or_else(|why| panic!("case {case}: check_path refuses the plan: {why}"));
        assert_eq!(again.clearances_mm, p.clearances_mm, "case {case}");
        // The reported clearances are the exact ones.
        let c = p.clearances_mm;
        for (label, got) in [
            (Label::Vessel, c.vessel),
            (Label::Nerve, c.nerve),
            (Label::Bone, c.bone),
        ] {
            let want = brute(&seg.labels, label, e, t, (mm, mm));
            match got {
                Some(g) => assert!(
                    (g - want).abs() < 1e-6,
                    "case {case}: {label:?} {g} vs {want}"
                ),
                None => assert!(
                    want.is_infinite(),
                    "case {case}: {label:?} present but null"
                ),
            }
        }
    }
    eprintln!("{ok} of {CASES} random cases got a path, {joint_ok} with a final approach");
    // The property means little if almost nothing is planned.
    const MIN_PLANNED: usize = 20;
    assert!(ok >= MIN_PLANNED, "only {ok} paths to judge");
    assert!(
        joint_ok >= 1,
        "no joint target exercised the final approach"
    );
}

#[test]
fn planner_and_smoother_share_one_angle_definition() {
    // A frame whose skin line is tilted (a fan's near arc is, off its centre): an angle to
    // the horizontal would differ from the angle to the skin.
    use sonoguide::sim::phantom::{frame_of, generate, Geometry, PhantomParams};
    let pipeline = Pipeline::builder().backend(Backend::Cpu).build().unwrap();
    let mut checked = 0;
    for seed in 1..12 {
        let mut pp = PhantomParams::default();
        pp.seed = seed;
        pp.geometry = Geometry::Curved;
        let frame = frame_of(&generate("angle", &pp).unwrap(), 0).unwrap();
        let r = pipeline.process(&frame).unwrap();
        if !r.plan.is_ok() {
            continue;
        }
        let mut smoother = PlanSmoother::new();
        let params = pipeline.config().plan.clone();
        let first = smoother.smooth(&frame, &r.segmentation, &r.plan, &params);
        // The same frame again: the smoother keeps the entry and target and re-checks them.
        let again = smoother.smooth(&frame, &r.segmentation, &r.plan, &params);
        assert_eq!(first, r.plan);
        let (a, b) = (again.angle_deg.unwrap(), r.plan.angle_deg.unwrap());
        assert!(
            (a - b).abs() < 1e-9,
            "seed {seed}: smoother {a} vs planner {b}"
        );
        checked += 1;
    }
    assert!(checked >= 2, "only {checked} curved phantoms got a path");
}
