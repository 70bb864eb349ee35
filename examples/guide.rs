//! One DICOM file to an overlay: `cargo run --release --example guide -- FILE.dcm out.png`.
//! Prints the plan of the first frame as JSON.

use sonoguide::dicom::{DicomFile, ReadOptions};
use sonoguide::Pipeline;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let input = args
        .next()
        .unwrap_or_else(|| "sample-data/linear_0002.dcm".into());
    let output = args.next().unwrap_or_else(|| "overlay.png".into());
    let pipeline = Pipeline::builder().build()?;
    let file = DicomFile::open(&input, &ReadOptions::default())?;
    let frame = file.read_frame(0)?;
    let result = pipeline.process(&frame)?;
    let overlay = sonoguide::overlay::draw_plan(
        &result.despeckled,
        &result.segmentation.labels,
        &result.plan,
        result.segmentation.mm_per_px,
    )?;
    overlay.save(&output)?;
    println!("{}", serde_json::to_string_pretty(&result.plan)?);
    eprintln!(
        "{input} → {output} on {} in {:.1} ms",
        pipeline.despeckler().device_name(),
        result.timings.total_ms
    );
    Ok(())
}
