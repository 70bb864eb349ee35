// coherence.wgsl: structure tensor of the central-difference gradient summed over a
// (2r+1)² window; coherence ((Jxx−Jyy)² + 4Jxy²) / ((Jxx+Jyy)² + ε) in [0, 1] → dst, and the
// orientation of the structure (perpendicular to the mean gradient), radians in (−π/2, π/2],
// 0 = horizontal → aux. Edges clamped.
// Bindings: src → dst, aux. Dispatch: ceil(w/16) × ceil(h/16) workgroups of 16×16.
// Keep Params in sync with src/kernels/coherence.rs.

struct Params {
    width: u32,
    height: u32,
    radius: u32,
    pad0: u32,
}
@group(0) @binding(0) var<uniform> p: Params;

const TENSOR_EPSILON: f32 = 1e-3;
const HALF_PI: f32 = 1.5707963;

@compute @workgroup_size(16, 16)
fn coherence(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x >= p.width || id.y >= p.height) {
        return;
    }
    let r = i32(p.radius);
    var jxx = 0.0;
    var jxy = 0.0;
    var jyy = 0.0;
    for (var dy = -r; dy <= r; dy++) {
        for (var dx = -r; dx <= r; dx++) {
            let x = i32(id.x) + dx;
            let y = i32(id.y) + dy;
            let gx = 0.5 * (load_src(x + 1, y, p.width, p.height) - load_src(x - 1, y, p.width, p.height));
            let gy = 0.5 * (load_src(x, y + 1, p.width, p.height) - load_src(x, y - 1, p.width, p.height));
            jxx += gx * gx;
            jxy += gx * gy;
            jyy += gy * gy;
        }
    }
    let d = jxx - jyy;
    let t = jxx + jyy;
    let i = id.y * p.width + id.x;
    dst[i] = (d * d + 4.0 * jxy * jxy) / (t * t + TENSOR_EPSILON);
    // Mean gradient direction, then turned by 90°.
    var a = 0.5 * atan2(2.0 * jxy, d) + HALF_PI;
    if (a > HALF_PI) {
        a -= 2.0 * HALF_PI;
    }
    aux[i] = a;
}
