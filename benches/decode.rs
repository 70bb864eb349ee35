//! Decode speed of the corpus files that stand for what archives hold: the 30-frame
//! YBR_FULL_422 JPEG baseline cine and the 800x350 palette-colour file.
//! Run: `cargo bench --bench decode`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sonoguide::dicom::{DicomFile, ReadOptions};

fn decode(c: &mut Criterion) {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/dicom-corpus/files");
    let mut group = c.benchmark_group("decode");
    for name in [
        "examples_ybr_color.dcm",
        "examples_palette.dcm",
        "US1_J2KR.dcm",
        "OBXXXX1A_rle.dcm",
    ] {
        let file = match DicomFile::open(dir.join(name), &ReadOptions::default()) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("skipping {name}: {e}");
                continue;
            }
        };
        group.throughput(Throughput::Elements(file.frame_count() as u64));
        group.bench_function(name.trim_end_matches(".dcm"), |b| {
            b.iter(|| {
                for f in file.frames() {
                    std::hint::black_box(f.map(|f| f.intensity.len()).unwrap_or(0));
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
