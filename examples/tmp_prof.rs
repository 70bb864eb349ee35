use sonoguide::phantom::*;
use sonoguide::{Backend, Despeckler, Filter};
use std::time::Instant;
fn main() {
    let mut p = PhantomParams::default(); p.seed = 601; p.width = 640; p.height = 480;
    let ph = generate("x", &p).unwrap();
    let frame = frame_of(&ph, 0).unwrap();
    let d = Despeckler::new(Backend::Cpu).unwrap();
    let sp = sonoguide::segment::SegmentParams::default();
    for _ in 0..3 {
        let t = Instant::now();
        let des = d.run(&frame.intensity, &[Filter::default_for("srad").unwrap()]).unwrap();
        let t1 = t.elapsed();
        let t = Instant::now(); let vf = sonoguide::segment::valid_mask(&frame); let tv = t.elapsed();
        let t = Instant::now(); let (grid, valid, step, mm) = sonoguide::segment::analysis_grid(&frame, &des, &vf, &sp); let tg = t.elapsed();
        let fp = sonoguide::segment::feature_params(&sp, mm, grid.nrows()).unwrap();
        let t = Instant::now(); let plan = sonoguide::kernels::phase_symmetry::Plan::new(&fp.0, grid.ncols(), grid.nrows()); let t = Instant::now(); let ps = plan.run(&grid).unwrap(); let tps = t.elapsed();
        let t = Instant::now(); let below = sonoguide::kernels::shadow::cpu(&grid, &fp.1).unwrap(); let tsh = t.elapsed();
        let t = Instant::now(); let (c, o) = sonoguide::kernels::coherence::cpu_fast(&grid, &fp.2).unwrap(); let tc = t.elapsed();
        let f = sonoguide::segment::Features { intensity: grid, phase_symmetry: ps, below, coherence: c, orientation: o, valid, valid_full: vf, step, mm_per_px: mm };
        breakdown(&frame, &des, &f, &sp);
        let t = Instant::now(); let _s = sonoguide::segment::segment_from_features(&frame, &des, &f, &sp).unwrap(); let ts = t.elapsed();
        println!("despeckle {t1:?} valid {tv:?} grid {tg:?} ps {tps:?} shadow {tsh:?} coh {tc:?} decide {ts:?}");
    }
}
#[allow(dead_code)]
pub fn breakdown(frame: &sonoguide::Frame, des: &ndarray::Array2<f32>, f: &sonoguide::segment::Features, sp: &sonoguide::segment::SegmentParams) {
    use sonoguide::segment::*;
    let b = frame.region.bounds;
    let crop = des.slice(ndarray::s![b.y0..b.y1, b.x0..b.x1]).to_owned();
    let mm = (f.mm_per_px.0 / f.step as f64, f.mm_per_px.1 / f.step as f64);
    let t = Instant::now(); let s = bone::surface(f, sp); let t1 = t.elapsed();
    let t = Instant::now(); let sf = bone::refine(&s, &crop, f.step, mm); let t2 = t.elapsed();
    let mut labels = ndarray::Array2::<u8>::zeros(crop.dim());
    let t = Instant::now(); bone::label_bone_and_shadow(&sf, &f.valid_full, mm, &mut labels); let t3 = t.elapsed();
    let t = Instant::now(); fluid::label_joint_and_effusion(&crop, &f.valid_full, &sf, mm, sp, &mut labels); let t4 = t.elapsed();
    let t = Instant::now(); fluid::label_vessels(&crop, &f.valid_full, mm, sp, &mut labels); let t5 = t.elapsed();
    let t = Instant::now(); tendon::label_tendon(&crop, f, &f.valid_full, &sf, mm, &mut labels); let t6 = t.elapsed();
    println!("surface {t1:?} refine {t2:?} bone {t3:?} joint {t4:?} vessel {t5:?} tendon {t6:?}");
}
