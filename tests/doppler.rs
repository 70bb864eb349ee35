//! Colour Doppler: a coloured-flow scene made as an RGB DICOM, read back through the reader.
//! The flow lies where the B-mode shows only tissue; it must be labelled vessel and no path
//! may come within the vessel margin of it.

use std::path::PathBuf;

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use sonoguide::dicom::{DicomFile, ReadOptions};
use sonoguide::label::Label;
use sonoguide::sim::phantom::{write_case, PhantomParams};
use sonoguide::{Backend, Pipeline};

/// Radius of the painted flow, mm (a 3 mm vessel, e.g. a genicular artery with its halo).
const FLOW_RADIUS_MM: f64 = 1.5;
/// Share of the painted flow that must come out as vessel (its rim is partly below the
/// chroma threshold after blending).
const MIN_FLOW_RECALL: f64 = 0.9;

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sonoguide-doppler-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Rewrites the greyscale US image at `src` as RGB with a red flow disc at `centre` (px) of
/// `radius` px, as a colour-flow scanner would display it.
fn paint_flow(src: &PathBuf, dst: &PathBuf, centre: [f64; 2], radius: f64) -> Vec<(usize, usize)> {
    let mut obj = dicom_object::open_file(src).unwrap();
    let rows = obj.element(tags::ROWS).unwrap().to_int::<usize>().unwrap();
    let cols = obj
        .element(tags::COLUMNS)
        .unwrap()
        .to_int::<usize>()
        .unwrap();
    let grey = obj
        .element(tags::PIXEL_DATA)
        .unwrap()
        .to_bytes()
        .unwrap()
        .to_vec();
    let mut rgb = Vec::with_capacity(rows * cols * 3);
    let mut flow = Vec::new();
    for y in 0..rows {
        for x in 0..cols {
            let g = grey[y * cols + x];
            let inside = (x as f64 - centre[0]).hypot(y as f64 - centre[1]) <= radius;
            if inside {
                // Arterial flow towards the probe: red, brightness by velocity.
                rgb.extend_from_slice(&[220, 40, 30]);
                flow.push((y, x));
            } else {
                rgb.extend_from_slice(&[g, g, g]);
            }
        }
    }
    let put = |obj: &mut dicom_object::DefaultDicomObject, tag, vr, v: PrimitiveValue| {
        obj.put(DataElement::new(tag, vr, v));
    };
    put(
        &mut obj,
        tags::SAMPLES_PER_PIXEL,
        VR::US,
        PrimitiveValue::from(3u16),
    );
    put(
        &mut obj,
        tags::PHOTOMETRIC_INTERPRETATION,
        VR::CS,
        PrimitiveValue::from("RGB"),
    );
    put(
        &mut obj,
        tags::PLANAR_CONFIGURATION,
        VR::US,
        PrimitiveValue::from(0u16),
    );
    put(
        &mut obj,
        tags::PIXEL_DATA,
        VR::OB,
        PrimitiveValue::from(rgb),
    );
    obj.write_to_file(dst).unwrap();
    flow
}

#[test]
fn colour_flow_is_a_vessel_and_no_path_crosses_it() {
    let dir = temp("scene");
    let pipeline = Pipeline::builder().backend(Backend::Cpu).build().unwrap();
    let mut tried = 0;
    for seed in [2u64, 4, 6, 8, 10, 12] {
        let mut pp = PhantomParams::default();
        pp.seed = seed;
        let name = format!("flow{seed}");
        write_case(&dir, &name, &pp).unwrap();
        let grey = dir.join(format!("{name}.dcm"));
        let file = DicomFile::open(&grey, &ReadOptions::default()).unwrap();
        let frame = file.read_frame(0).unwrap();
        let before = pipeline.process(&frame).unwrap().plan;
        let (Some(e), Some(t)) = (before.entry, before.target) else {
            continue;
        };
        if !before.is_ok() {
            continue;
        }
        tried += 1;
        // Flow across the middle of the path the B-mode alone gave.
        let mm = frame.calibration.mm_per_px().unwrap();
        let mid = [(e.px[0] + t.px[0]) / 2.0, (e.px[1] + t.px[1]) / 2.0];
        let radius = FLOW_RADIUS_MM / mm.0;
        let coloured = dir.join(format!("{name}_flow.dcm"));
        let flow = paint_flow(&grey, &coloured, mid, radius);
        let file = DicomFile::open(&coloured, &ReadOptions::default()).unwrap();
        let frame = file.read_frame(0).unwrap();
        assert!(frame.rgb.is_some(), "the scene reads back as colour");
        let r = pipeline.process(&frame).unwrap();
        let labels = &r.segmentation.labels;
        let hit = flow
            .iter()
            .filter(|p| labels[**p] == Label::Vessel.code())
            .count();
        assert!(
            hit as f64 >= MIN_FLOW_RECALL * flow.len() as f64,
            "seed {seed}: {hit} of {} flow pixels labelled vessel",
            flow.len()
        );
        let p = &r.plan;
        if let (true, Some(e), Some(t)) = (p.is_ok(), p.entry, p.target) {
            // The path keeps the vessel margin from every flow pixel centre (the planner
            // measures to pixel squares, which are nearer still).
            let margin = pipeline.config().plan.vessel_margin_mm;
            let to_mm = |q: [f64; 2]| [q[0] * mm.0, q[1] * mm.1];
            let (a, b) = (to_mm(e.px), to_mm(t.px));
            let nearest = flow
                .iter()
                .map(|&(y, x)| {
                    let c = to_mm([x as f64, y as f64]);
                    sonoguide::plan::path::point_segment_distance(c, a, b)
                })
                .fold(f64::INFINITY, f64::min);
            assert!(
                nearest >= margin,
                "seed {seed}: path passes {nearest} mm from the flow"
            );
            assert!(p.clearances_mm.vessel.is_some_and(|v| v >= margin));
        } else {
            assert!(p.reason.is_some(), "seed {seed}: refused without a reason");
        }
    }
    assert!(
        tried >= 2,
        "only {tried} phantoms had a path to put flow across"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
