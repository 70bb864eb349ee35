// lee.wgsl: Lee's local-statistics speckle filter over a (2r+1)² window.
// out = m + W (I − m), W = clamp(1 − Cu²/Ci², 0, 1), Ci² = var/m², Cu = noise_cv.
// Bindings: src → dst. Dispatch: ceil(w/16) × ceil(h/16) workgroups of 16×16.
// Keep Params in sync with src/kernels/lee.rs.

struct Params {
    width: u32,
    height: u32,
    radius: u32,
    pad0: u32,
    noise_cv: f32,
    pad1: f32,
    pad2: f32,
    pad3: f32,
}
@group(0) @binding(0) var<uniform> p: Params;

const MEAN_FLOOR: f32 = 1e-3;

@compute @workgroup_size(16, 16)
fn lee(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x >= p.width || id.y >= p.height) {
        return;
    }
    let r = i32(p.radius);
    let x = i32(id.x);
    let y = i32(id.y);
    let ms = window_mean_var(x, y, r, p.width, p.height);
    let m = ms.x;
    let variance = ms.y;
    let ci2 = variance / max(m * m, MEAN_FLOOR);
    let cu2 = p.noise_cv * p.noise_cv;
    var w = 0.0;
    if (ci2 > 0.0) {
        w = clamp(1.0 - cu2 / ci2, 0.0, 1.0);
    }
    let i = load_src(x, y, p.width, p.height);
    dst[id.y * p.width + id.x] = m + w * (i - m);
}
