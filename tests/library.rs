//! The library surface guidance software uses: a pipeline built once, frames from anything,
//! sessions for streams, sharing a GPU device, and thread safety.

mod common;

use sonoguide::dicom::{DicomFile, ReadOptions};
use sonoguide::sim::phantom::{frame_of, generate, PhantomParams};
use sonoguide::{Backend, Frame, Pipeline, Ran, Session};

#[test]
fn pipeline_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Pipeline>();
    check::<Session>();
    check::<sonoguide::Error>();
}

fn sample() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sample-data/linear_0002.dcm")
}

#[test]
fn frames_from_dicom_bytes_raw_buffers_and_images_give_the_same_plan() {
    let pipeline = Pipeline::builder().backend(Backend::Cpu).build().unwrap();
    let file = DicomFile::open(sample(), &ReadOptions::default()).unwrap();
    let from_file = file.read_frame(0).unwrap();
    let reference = pipeline.process(&from_file).unwrap();
    assert!(reference.plan.is_ok());

    let from_bytes = Frame::from_dicom_bytes(std::fs::read(sample()).unwrap(), 0).unwrap();
    assert_eq!(from_bytes.intensity, from_file.intensity);

    let (w, h) = (from_file.width(), from_file.height());
    let spacing = from_file.calibration.mm_per_px().unwrap();
    let gray = from_file.gray8();
    let gray16: Vec<u16> = gray.iter().map(|v| *v as u16 * 257).collect();
    let raw16 = Frame::from_gray16(w, h, &gray16, 16, spacing).unwrap();
    let img = image::DynamicImage::ImageLuma8(
        image::GrayImage::from_raw(w as u32, h as u32, gray.clone()).unwrap(),
    );
    let from_image = Frame::from_image(&img, spacing).unwrap();
    for f in [&raw16, &from_image] {
        let r = pipeline.process(f).unwrap();
        // No reference pixel here: the same target, laterally offset by the reference column.
        assert_eq!(r.plan.status, reference.plan.status);
        assert_eq!(r.plan.target.unwrap().px, reference.plan.target.unwrap().px);
        assert!((r.plan.depth_mm.unwrap() - reference.plan.depth_mm.unwrap()).abs() < 1e-9);
    }
    // Bad buffers are refused, not panicked on.
    assert!(Frame::from_gray16(w, h, &gray16[1..], 16, (0.08, 0.08)).is_err());
    assert!(Frame::from_gray16(w, h, &gray16, 0, (0.08, 0.08)).is_err());
    assert_eq!(
        Frame::from_gray16(w, h, &gray16, 16, (0.0, 0.08))
            .unwrap()
            .calibration
            .status(),
        "unusable"
    );
}

#[test]
fn sessions_keep_their_own_state() {
    let pipeline = Pipeline::builder().backend(Backend::Cpu).build().unwrap();
    let mut p = PhantomParams::default();
    p.seed = 2;
    p.frames = 3;
    let ph = generate("s", &p).unwrap();
    let (mut a, mut b) = (Session::new(), Session::new());
    for k in 0..3 {
        let f = frame_of(&ph, k).unwrap();
        let ra = pipeline.process_in(&mut a, &f).unwrap();
        let rb = pipeline.process_in(&mut b, &f).unwrap();
        assert_eq!(ra.plan, rb.plan, "two streams of the same frames agree");
    }
    assert_eq!((a.frames(), b.frames()), (3, 3));
}

#[test]
fn a_cpu_pipeline_reports_every_stage_on_the_cpu() {
    let pipeline = Pipeline::builder().backend(Backend::Cpu).build().unwrap();
    let frame = Frame::from_dicom_bytes(std::fs::read(sample()).unwrap(), 0).unwrap();
    let r = pipeline.process(&frame).unwrap();
    assert_eq!(r.backends.despeckle, Ran::Cpu);
    assert_eq!(r.backends.features, Ran::Cpu);
    assert_eq!(pipeline.despeckler().backend_name(), "cpu");
}

#[test]
fn pipelines_can_share_one_gpu_device_across_threads() {
    let first = match Pipeline::builder().backend(Backend::Gpu).build() {
        Ok(p) => p,
        Err(e) => {
            common::missing_tool(
                "shared GPU device",
                &format!("a GPU adapter (lavapipe): {e}"),
            );
            return;
        }
    };
    let gpu = first.despeckler().gpu_handle().unwrap();
    let second = Pipeline::builder().shared_gpu(gpu.clone()).build().unwrap();
    assert!(std::sync::Arc::ptr_eq(
        &gpu,
        &second.despeckler().gpu_handle().unwrap()
    ));
    let mut p = PhantomParams::default();
    p.seed = 2;
    p.width = 200;
    p.height = 160;
    let frame = frame_of(&generate("g", &p).unwrap(), 0).unwrap();
    let r = first.process(&frame).unwrap();
    // Each stage reports the backend that ran it: the GPU here.
    assert_eq!(r.backends.despeckle, Ran::Gpu);
    assert_eq!(r.backends.features, Ran::Gpu);
    let expected = r.despeckled;
    std::thread::scope(|s| {
        let hs: Vec<_> = [&first, &second, &first, &second]
            .into_iter()
            .map(|pl| s.spawn(|| pl.process(&frame).unwrap().despeckled))
            .collect();
        for h in hs {
            assert_eq!(
                h.join().unwrap(),
                expected,
                "concurrent chains on one device"
            );
        }
    });
}

#[test]
fn frames_broken_after_construction_are_refused_not_panicked_on() {
    let pipeline = Pipeline::builder().backend(Backend::Cpu).build().unwrap();
    let good = Frame::from_dicom_bytes(std::fs::read(sample()).unwrap(), 0).unwrap();
    let (w, h) = (good.width(), good.height());

    let mut outside = good.clone();
    outside.region.bounds.x1 = w + 50; // a region beyond the frame
    let mut empty = good.clone();
    empty.region.bounds.y1 = empty.region.bounds.y0; // an empty region
    let mut nan = good.clone();
    nan.intensity[[3, 7]] = f32::NAN;
    let mut mask = good.clone();
    mask.colour_mask = Some(ndarray::Array2::zeros((h / 2, w))); // the wrong size
    for (what, frame) in [
        ("region", &outside),
        ("region", &empty),
        ("intensity", &nan),
        ("colour_mask", &mask),
    ] {
        let e = pipeline.process(frame).unwrap_err().to_string();
        assert!(e.contains(what), "{what}: {e}");
        let e = sonoguide::segment::segment(frame, &good.intensity, &Default::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains(what), "{what}: {e}");
    }
    // The planner refuses too, with the reason.
    let seg = pipeline.process(&good).unwrap().segmentation;
    let p = sonoguide::plan::plan(&outside, &seg, &Default::default());
    assert_eq!(p.status, "no_safe_path");
    assert!(p.reason.as_deref().unwrap().contains("region"));
    // A despeckled image of another size is refused by the segmenter.
    let small = ndarray::Array2::<f32>::zeros((h / 2, w / 2));
    assert!(sonoguide::segment::segment(&good, &small, &Default::default()).is_err());
}

/// The pipeline despeckles the imaging region only: the margins around it come back as they
/// were, and the region is filtered as an image of its own (nothing from the margins bleeds in).
#[test]
fn despeckling_covers_the_imaging_region_only() {
    use sonoguide::frame::{CalibrationSource, RegionSource};
    use sonoguide::{Calibration, Despeckler, Filter, Rect};
    let (w, h) = (120usize, 100usize);
    // Speckle-like texture, with bright "text" in the margins.
    let mut seed = 0x2026_1207u64;
    let pixels: Vec<u8> = (0..w * h)
        .map(|i| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let (x, y) = (i % w, i / w);
            if !(20..100).contains(&x) || !(10..90).contains(&y) {
                if (x + y) % 7 == 0 {
                    255
                } else {
                    0
                }
            } else {
                40 + (seed >> 57) as u8
            }
        })
        .collect();
    let calibration = Calibration::Ok {
        mm_per_px_x: 0.1,
        mm_per_px_y: 0.1,
        reference_px: None,
        source: CalibrationSource::Given,
    };
    let mut frame = Frame::from_gray8(w, h, &pixels, calibration).unwrap();
    frame.region.bounds = Rect {
        x0: 20,
        y0: 10,
        x1: 100,
        y1: 90,
    };
    frame.region.source = RegionSource::UltrasoundRegion;
    let filters = vec![
        Filter::default_for("median").unwrap(),
        Filter::default_for("srad").unwrap(),
    ];
    let pipeline = Pipeline::builder()
        .backend(Backend::Cpu)
        .filters(filters.clone())
        .build()
        .unwrap();
    let r = pipeline.process(&frame).unwrap();
    let b = frame.region.bounds;
    let inside = frame
        .intensity
        .slice(ndarray::s![b.y0..b.y1, b.x0..b.x1])
        .to_owned();
    let alone = Despeckler::new(Backend::Cpu)
        .unwrap()
        .run(&inside, &filters)
        .unwrap();
    for ((y, x), &v) in r.despeckled.indexed_iter() {
        if b.contains(x, y) {
            assert_eq!(v, alone[[y - b.y0, x - b.x0]], "region pixel ({x}, {y})");
        } else {
            assert_eq!(v, frame.intensity[[y, x]], "margin pixel ({x}, {y})");
        }
    }
}
