// common.wgsl: bindings and helpers shared by every kernel; prepended to each kernel's file.
// Bindings (keep in sync with src/gpu/context.rs):
//   0 uniform Params (declared by each kernel, one 256-byte slot per dispatch)
//   1 src:   the current image, row-major f32 (read)
//   2 dst:   the next image (written by kernels that produce one)
//   3 aux:   a scratch image (SRAD's diffusion coefficients)
//   4 stats: per-frame statistics (SRAD's q0² at 0, per-workgroup partial sums from 4 on)
// Edge rule everywhere: clamp to edge.

@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;
@group(0) @binding(3) var<storage, read_write> aux: array<f32>;
@group(0) @binding(4) var<storage, read_write> stats: array<f32>;

fn clamp_index(x: i32, y: i32, w: u32, h: u32) -> u32 {
    let cx = clamp(x, 0, i32(w) - 1);
    let cy = clamp(y, 0, i32(h) - 1);
    return u32(cy) * w + u32(cx);
}

fn load_src(x: i32, y: i32, w: u32, h: u32) -> f32 {
    return src[clamp_index(x, y, w, h)];
}

// Mean and variance of the (2r+1)² window around (x, y), edges clamped: the sum first, then
// the sum of squared deviations from the mean (the CPU twins' kernels::window_stats).
fn window_mean_var(x: i32, y: i32, r: i32, w: u32, h: u32) -> vec2<f32> {
    var sum = 0.0;
    for (var dy = -r; dy <= r; dy++) {
        for (var dx = -r; dx <= r; dx++) {
            sum += load_src(x + dx, y + dy, w, h);
        }
    }
    let n = f32((2 * r + 1) * (2 * r + 1));
    let m = sum / n;
    var ss = 0.0;
    for (var dy = -r; dy <= r; dy++) {
        for (var dx = -r; dx <= r; dx++) {
            let d = load_src(x + dx, y + dy, w, h) - m;
            ss += d * d;
        }
    }
    return vec2<f32>(m, ss / n);
}
