//! Feature kernels (at the analysis grid of 640x480 and 1024x768 frames) and whole-frame
//! segmentation (despeckle + features + decisions), CPU and GPU. Run:
//! `cargo bench --bench segment`. GPU cases need a hardware adapter, or
//! `SONOGUIDE_BENCH_SOFTWARE_GPU=1` for lavapipe.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sonoguide::segment::{analysis_grid, feature_params, segment_with, valid_mask, SegmentParams};
use sonoguide::sim::phantom::{frame_of, generate, PhantomParams};
use sonoguide::{Backend, Despeckler, Filter};

fn segment(c: &mut Criterion) {
    let cpu = Despeckler::new(Backend::Cpu).expect("cpu");
    let gpu = sonoguide::sim::bench::bench_gpu()
        .map_err(|reason| eprintln!("{reason}"))
        .ok();
    let seg = SegmentParams::default();
    let srad = Filter::default_for("srad").expect("srad");
    for (w, h) in [(640usize, 480usize), (1024, 768)] {
        let mut p = PhantomParams::default().with_nominal_scanner();
        p.width = w;
        p.height = h;
        p.seed = 4242;
        let ph = generate("bench", &p).expect("phantom");
        let frame = frame_of(&ph, 0).expect("frame");
        let valid = valid_mask(&frame);
        let (grid, _, _, mm) = analysis_grid(&frame, &frame.intensity, &valid, &seg);
        let fp = feature_params(&seg, mm, grid.nrows()).expect("params");
        let id = format!("{w}x{h}");
        let plan = sonoguide::kernels::phase_symmetry::Plan::new(&fp.0, grid.ncols(), grid.nrows());
        let mut g = c.benchmark_group("phase_symmetry");
        g.throughput(Throughput::Elements((grid.len()) as u64));
        g.bench_with_input(BenchmarkId::new("cpu", &id), &grid, |b, grid| {
            b.iter(|| plan.run(grid).expect("ps"))
        });
        if let Some(d) = &gpu {
            let ctx = d.gpu_context().expect("ctx");
            g.bench_with_input(BenchmarkId::new("gpu", &id), &grid, |b, grid| {
                b.iter(|| {
                    let mut chain = ctx.begin(grid).expect("begin");
                    sonoguide::kernels::phase_symmetry::encode(&mut chain, &fp.0).expect("encode");
                    chain.finish().expect("finish")
                })
            });
        }
        g.finish();
        let mut g = c.benchmark_group("shadow");
        g.bench_with_input(BenchmarkId::new("cpu", &id), &grid, |b, grid| {
            b.iter(|| sonoguide::kernels::shadow::cpu(grid, &fp.1).expect("shadow"))
        });
        g.finish();
        let mut g = c.benchmark_group("coherence");
        g.bench_with_input(BenchmarkId::new("cpu", &id), &grid, |b, grid| {
            b.iter(|| sonoguide::kernels::coherence::cpu_fast(grid, &fp.2).expect("coherence"))
        });
        g.finish();
        let mut g = c.benchmark_group("segment");
        g.sample_size(20);
        g.throughput(Throughput::Elements(1));
        for (name, d) in [("cpu", Some(&cpu)), ("gpu", gpu.as_ref())] {
            let Some(d) = d else { continue };
            g.bench_with_input(BenchmarkId::new(name, &id), &frame, |b, frame| {
                b.iter(|| {
                    let des = d
                        .run(&frame.intensity, std::slice::from_ref(&srad))
                        .expect("despeckle");
                    segment_with(d, frame, &des, &seg).expect("segment")
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, segment);
criterion_main!(benches);
