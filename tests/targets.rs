//! Where the planner puts each kind of target, on hand-drawn label maps: the centre of the
//! joint fluid between the bone ends, an effusion's middle 1 mm above its floor, and a tendon
//! or nerve where the image is centred, not the largest one; and the nerve margin the planner
//! keeps includes the allowance for the uncertainty of a nerve's outline.

use ndarray::Array2;
use sonoguide::frame::{Calibration, CalibrationSource, Frame};
use sonoguide::label::Label;
use sonoguide::plan::{check_path, plan, PlanParams, TargetKind, NERVE_OUTLINE_ALLOWANCE_MM};
use sonoguide::segment::Segmentation;
use sonoguide::{Backend, Pipeline};

/// Frame size and pixel size of the drawings.
const W: usize = 200;
const H: usize = 150;
const MM: f64 = 0.1;

/// A target lies on a pixel of the structure or a fraction of a pixel from the stated point:
/// the rules snap to pixels and round millimetre offsets to rows.
const PIXEL_TOLERANCE: f64 = 1.0;

/// An empty segmentation of a `W` × `H` frame at `MM` mm per pixel, to draw on.
fn canvas() -> (Frame, Segmentation) {
    let calibration = Calibration::Ok {
        mm_per_px_x: MM,
        mm_per_px_y: MM,
        reference_px: None,
        source: CalibrationSource::Given,
    };
    let frame = Frame::from_gray8(W, H, &vec![80u8; W * H], calibration).unwrap();
    let pipeline = Pipeline::builder().backend(Backend::Cpu).build().unwrap();
    let mut seg = pipeline.process(&frame).unwrap().segmentation;
    seg.labels = Array2::zeros((H, W));
    seg.possible_nerve = None;
    (frame, seg)
}

fn fill(
    labels: &mut Array2<u8>,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    l: Label,
) {
    for y in rows {
        for x in cols.clone() {
            labels[[y, x]] = l.code();
        }
    }
}

/// The target the planner chooses for `kinds` (whether or not a path reaches it).
fn target(frame: &Frame, seg: &Segmentation, kinds: &[TargetKind]) -> ([f64; 2], TargetKind) {
    let mut p = PlanParams::default();
    p.targets = kinds.to_vec();
    let plan = plan(frame, seg, &p);
    let t = plan.target.unwrap_or_else(|| panic!("no target: {plan:?}"));
    (t.px, plan.target_kind.unwrap())
}

#[test]
fn the_joint_target_is_the_centre_of_the_fluid_between_the_bone_ends() {
    let (frame, mut seg) = canvas();
    // Two bones whose surfaces are at row 100, a gap over columns 90..110; the joint space
    // fills the gap down to row 130, and fluid bulges 4 mm above it (rows 60..100), wider
    // than the gap (columns 70..130, over the bones too).
    fill(&mut seg.labels, 100..103, 20..90, Label::Bone);
    fill(&mut seg.labels, 100..103, 110..180, Label::Bone);
    fill(&mut seg.labels, 103..150, 20..90, Label::Shadow);
    fill(&mut seg.labels, 103..150, 110..180, Label::Shadow);
    fill(&mut seg.labels, 60..100, 70..130, Label::Joint);
    fill(&mut seg.labels, 100..130, 90..110, Label::Joint);
    let ([x, y], kind) = target(&frame, &seg, &[TargetKind::JointSpace]);
    assert_eq!(kind, TargetKind::JointSpace);
    // The joint pixels in the columns between the bones (90..110, rows 60..130): centre
    // (99.5, 94.5); the fluid over the bones themselves does not count.
    assert!((x - 99.5).abs() <= PIXEL_TOLERANCE, "column {x}");
    assert!((y - 94.5).abs() <= PIXEL_TOLERANCE, "row {y}");
}

#[test]
fn the_effusion_target_is_its_middle_one_millimetre_above_its_floor() {
    let (frame, mut seg) = canvas();
    // Bone along row 120; a small collection at the left (columns 20..40, rows 95..120) and
    // a larger one (columns 80..160, rows 90..120): the larger is the target.
    fill(&mut seg.labels, 120..123, 0..W, Label::Bone);
    fill(&mut seg.labels, 123..150, 0..W, Label::Shadow);
    fill(&mut seg.labels, 95..120, 20..40, Label::Joint);
    fill(&mut seg.labels, 90..120, 80..160, Label::Joint);
    let ([x, y], kind) = target(&frame, &seg, &[TargetKind::Effusion]);
    assert_eq!(kind, TargetKind::Effusion);
    // Middle column (80 + 159) / 2 = 119; floor row 119, 1 mm (10 rows) above: row 109.
    // That point keeps 1 mm from bone; the default margin is 2 mm, so the nearest pixel
    // that keeps it lies at row 99 (2 mm above the bone's top row 120, less half a pixel's
    // diagonal of slack in the check) straight above.
    assert!((x - 119.0).abs() <= PIXEL_TOLERANCE, "column {x}");
    assert!((95.0..109.0).contains(&y), "row {y}");

    // With no bone margin to keep, the point itself.
    let mut p = PlanParams::default();
    p.targets = vec![TargetKind::Effusion];
    p.margin_mm = 0.0;
    p.shadow_margin_mm = 0.0;
    let t = plan(&frame, &seg, &p).target.unwrap().px;
    assert!((t[0] - 119.0).abs() <= PIXEL_TOLERANCE, "column {}", t[0]);
    assert!((t[1] - 109.0).abs() <= PIXEL_TOLERANCE, "row {}", t[1]);
}

#[test]
fn tendon_and_nerve_targets_are_the_ones_the_image_is_centred_on() {
    let (frame, mut seg) = canvas();
    // A large tendon at the left (columns 0..90) and a smaller one crossing the centre
    // column 99 (columns 95..125), whose top is row 50.
    fill(&mut seg.labels, 30..45, 0..90, Label::Tendon);
    fill(&mut seg.labels, 50..60, 95..125, Label::Tendon);
    let ([x, y], kind) = target(&frame, &seg, &[TargetKind::Peritendinous]);
    assert_eq!(kind, TargetKind::Peritendinous);
    assert!((x - 99.0).abs() <= PIXEL_TOLERANCE, "column {x}");
    // 0.5 mm (5 rows) above row 50.
    assert!((y - 45.0).abs() <= PIXEL_TOLERANCE, "row {y}");
    let ([x, y], _) = target(&frame, &seg, &[TargetKind::Intratendinous]);
    assert!(
        (95.0..125.0).contains(&x) && (50.0..60.0).contains(&y),
        "inside the centred tendon: {x}, {y}"
    );

    // Nothing crosses the centre: the nearest wins, over the centre-most column it covers.
    let mut labels = Array2::zeros((H, W));
    fill(&mut labels, 80..100, 0..60, Label::Nerve);
    fill(&mut labels, 90..100, 130..150, Label::Nerve);
    seg.labels = labels;
    let ([x, _], kind) = target(&frame, &seg, &[TargetKind::Perineural]);
    assert_eq!(kind, TargetKind::Perineural);
    assert!((x - 130.0).abs() <= PIXEL_TOLERANCE, "column {x}");
}

#[test]
fn nerves_are_kept_their_margin_plus_the_outline_allowance() {
    let (frame, mut seg) = canvas();
    let params = PlanParams::default();
    // A 30° path from the skin to (160, 40) px, and a nerve disc of 1 mm radius beside its
    // middle at `gap` mm from it (measured to the disc's edge).
    let (entry, target) = (
        [160.0 - 40.0 / 30f64.to_radians().tan(), 0.0],
        [160.0, 40.0],
    );
    let mid = [(entry[0] + target[0]) / 2.0, 20.0];
    let normal = [-0.5, 30f64.to_radians().cos()];
    let radius_px = 10.0;
    let judge = |seg: &mut Segmentation, gap_mm: f64| {
        let r = radius_px + gap_mm / MM;
        let c = [mid[0] + normal[0] * r, mid[1] + normal[1] * r];
        seg.labels = Array2::from_shape_fn((H, W), |(y, x)| {
            if (x as f64 - c[0]).hypot(y as f64 - c[1]) <= radius_px {
                Label::Nerve.code()
            } else {
                0
            }
        });
        check_path(&frame, seg, &params, TargetKind::User, entry, target)
    };
    // Beyond the margin asked for (by more than half a pixel's diagonal, the pixel squares'
    // slack) but inside the allowance: refused.
    let inside = params.nerve_margin_mm + NERVE_OUTLINE_ALLOWANCE_MM / 2.0;
    assert!(
        judge(&mut seg, inside).is_err(),
        "a path {inside} mm from a nerve was accepted"
    );
    // Beyond margin and allowance: accepted, and the notes say what was kept.
    let outside = params.nerve_margin_mm + NERVE_OUTLINE_ALLOWANCE_MM + 0.3;
    let plan = judge(&mut seg, outside).expect("a path clear of margin and allowance");
    assert!(
        plan.notes
            .iter()
            .any(|n| n.contains("uncertainty of a nerve's outline")),
        "{:?}",
        plan.notes
    );
}
