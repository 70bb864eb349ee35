//! A loop over the frames of a cine, as a live feed would deliver them, with the plan smoothed
//! over time: `cargo run --release --example stream -- [CINE.dcm]`. Prints per-frame latency.

use sonoguide::dicom::{DicomFile, ReadOptions};
use sonoguide::{Pipeline, Session};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let input = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "sample-data/cine_0005.dcm".into());
    let pipeline = Pipeline::builder().build()?;
    let file = DicomFile::open(&input, &ReadOptions::default())?;
    let mut session = Session::new();
    let mut latencies = Vec::new();
    for frame in file.frames() {
        let frame = frame?;
        let r = pipeline.process_in(&mut session, &frame)?;
        latencies.push(r.timings.total_ms);
        let target = r
            .plan
            .target
            .map(|t| format!("({:.1}, {:.1}) mm", t.mm[0], t.mm[1]))
            .unwrap_or_else(|| "-".into());
        println!(
            "frame {:3}: {:>12} target {target:>20} angle {:>5} | {:.1} ms (despeckle {:.1}, features {:.1}, segment {:.1}, plan {:.1})",
            frame.index,
            r.plan.status,
            r.plan.angle_deg.map(|a| format!("{a:.0}°")).unwrap_or_else(|| "-".into()),
            r.timings.total_ms,
            r.timings.despeckle_ms,
            r.timings.features_ms,
            r.timings.segment_ms,
            r.timings.plan_ms
        );
    }
    latencies.sort_by(|a, b| a.total_cmp(b));
    if let Some(m) = latencies.get(latencies.len() / 2) {
        println!(
            "{} frames on {}: median {m:.1} ms",
            latencies.len(),
            pipeline.despeckler().device_name()
        );
    }
    Ok(())
}
