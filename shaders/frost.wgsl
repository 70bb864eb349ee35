// frost.wgsl: Frost's adaptive speckle filter over a (2r+1)² window.
// out = Σ w I / Σ w, w = exp(−K · Ci² · |offset|), Ci² = var/m² of the window, K = damping.
// Bindings: src → dst. Dispatch: ceil(w/16) × ceil(h/16) workgroups of 16×16.
// Keep Params in sync with src/kernels/frost.rs.

struct Params {
    width: u32,
    height: u32,
    radius: u32,
    pad0: u32,
    damping: f32,
    pad1: f32,
    pad2: f32,
    pad3: f32,
}
@group(0) @binding(0) var<uniform> p: Params;

const MEAN_FLOOR: f32 = 1e-3;

@compute @workgroup_size(16, 16)
fn frost(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x >= p.width || id.y >= p.height) {
        return;
    }
    let r = i32(p.radius);
    let x = i32(id.x);
    let y = i32(id.y);
    let ms = window_mean_var(x, y, r, p.width, p.height);
    let m = ms.x;
    let ci2 = ms.y / max(m * m, MEAN_FLOOR);
    let k = p.damping * ci2;
    var wsum = 0.0;
    var vsum = 0.0;
    for (var dy = -r; dy <= r; dy++) {
        for (var dx = -r; dx <= r; dx++) {
            let w = exp(-k * sqrt(f32(dx * dx + dy * dy)));
            wsum += w;
            vsum += w * load_src(x + dx, y + dy, p.width, p.height);
        }
    }
    dst[id.y * p.width + id.x] = vsum / wsum;
}
