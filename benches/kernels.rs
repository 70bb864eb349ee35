//! One criterion group per kernel, CPU production path and GPU (upload + kernel + read-back),
//! at 640x480 and 1024x768. Run: `cargo bench --bench kernels`.
//!
//! The GPU cases run when `Backend::Gpu` finds an adapter. A software adapter (lavapipe)
//! is hundreds of times slower than a GPU, so it is benched only when
//! `SONOGUIDE_BENCH_SOFTWARE_GPU=1` is set.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sonoguide::sim::bench::{bench_filters, speckle_frame};
use sonoguide::{Backend, Despeckler, Filter};

fn case_name(f: &Filter) -> String {
    let p: Vec<String> = f
        .parameters()
        .iter()
        .map(|(k, v)| format!("{k}{v}"))
        .collect();
    p.join("_")
}

fn kernels(c: &mut Criterion) {
    let cpu = Despeckler::new(Backend::Cpu).expect("cpu backend");
    let gpu = sonoguide::sim::bench::bench_gpu()
        .map_err(|reason| eprintln!("{reason}"))
        .ok();
    let filters = bench_filters().expect("filters");
    for (w, h) in [(640usize, 480usize), (1024, 768)] {
        let img = speckle_frame(w, h).expect("frame");
        for f in &filters {
            let mut group = c.benchmark_group(f.name());
            group.throughput(Throughput::Elements((w * h) as u64));
            let heavy =
                matches!(f, Filter::Obnlm(_)) || matches!(f, Filter::Srad(s) if s.iterations > 10);
            if heavy {
                group.sample_size(10);
            }
            let id = format!("{}/{w}x{h}", case_name(f));
            group.bench_with_input(BenchmarkId::new("cpu", &id), &img, |b, img| {
                b.iter(|| cpu.run(img, std::slice::from_ref(f)).expect("cpu run"))
            });
            if let Some(g) = &gpu {
                group.bench_with_input(BenchmarkId::new("gpu", &id), &img, |b, img| {
                    b.iter(|| g.run(img, std::slice::from_ref(f)).expect("gpu run"))
                });
            }
            group.finish();
        }
    }
}

criterion_group!(benches, kernels);
criterion_main!(benches);
