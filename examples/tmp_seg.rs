use sonoguide::phantom::*;
use sonoguide::{Backend, Despeckler, Filter};
fn main() {
    let seed: u64 = std::env::args().nth(1).unwrap().parse().unwrap();
    let mut p = PhantomParams::default(); p.seed = seed;
    let ph = generate("x", &p).unwrap();
    let frame = frame_of(&ph, 0).unwrap();
    let d = Despeckler::new(Backend::Cpu).unwrap();
    let des = d.run(&frame.intensity, &[Filter::default_for("srad").unwrap()]).unwrap();
    let sp = sonoguide::segment::SegmentParams::default();
    let f = sonoguide::segment::features_cpu(&frame, &des, &sp).unwrap();
    let s = sonoguide::segment::segment_from_features(&frame, &des, &f, &sp).unwrap();
    let pal = [[0,0,0],[230,159,0],[240,228,66],[0,114,178],[0,158,115],[213,94,0]];
    let (h, w) = des.dim();
    let mut buf = vec![0u8; h * w * 3 * 2];
    for y in 0..h { for x in 0..w {
        let g = des[[y,x]].clamp(0.0,255.0) as u8;
        for (k, lab) in [(0usize, s.labels[[y,x]]), (1, ph.labels[0][[y,x]])] {
            let i = (y * 2 * w + k * w + x) * 3;
            let c = pal[lab as usize];
            for ch in 0..3 { buf[i+ch] = if lab == 0 { g } else { ((g as u32 + 2 * c[ch] as u32) / 3) as u8 }; }
        }
    }}
    sonoguide::imageio::write_rgb_png(std::path::Path::new("/tmp/seg.png"), 2 * w, h, &buf).unwrap();
    let dump = |a: &ndarray::Array2<f32>, name: &str, scale: f32| { let g = a.mapv(|v| (v*scale).clamp(0.0,255.0) as u8); sonoguide::imageio::write_gray_png(std::path::Path::new(name), &g).unwrap(); };
    dump(&f.phase_symmetry, "/tmp/ps.png", 255.0); dump(&f.coherence, "/tmp/coh.png", 255.0);
    dump(&sonoguide::segment::bone::bone_score(&f), "/tmp/score.png", 255.0);
    let sgn: Vec<f64> = ph.truth.frames[0].bone_polylines_px.iter().flatten().filter_map(|q| { let x = q[0] as usize; s.bone_polylines_px.iter().flatten().find(|p| p[0] as usize == x).map(|p| p[1]-q[1]) }).collect();
    if !sgn.is_empty() { println!("signed offset mean {:.2} px", sgn.iter().sum::<f64>()/sgn.len() as f64); }
    println!("tissue level {}", sonoguide::segment::bone::tissue_level(&f));
    for l in 1..=5u8 { println!("label {l}: dice {:?}", sonoguide::eval::dice(&ph.labels[0], &s.labels, l)); }
}
#[allow(dead_code)]
fn _unused() {}
