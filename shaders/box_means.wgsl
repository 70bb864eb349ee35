// box_means.wgsl: the mean over the valid pixels of a window of half-sizes (ry, rx) around
// every pixel, clipped to the image (no valid pixel: 0); the pixel features' window means
// (segment::pixels, whose CPU twin is src/kernels/box_means.rs).
// src: two planes of w·h values, the values times the validity (at values_at), and the
// validity, 1 or 0 (at valid_at). aux: their vertical window sums (two planes at
// scratch_at). dst: the means (a plane at out_at). Offsets are in values.
// Running sums in the CPU twin's order (add the entering values, then subtract the leaving
// ones), one thread per column and plane, then one per row, so that they round as the CPU's
// do; only the final division may differ (by an ULP where a GPU's division is not correctly
// rounded).
// Dispatch: box_columns over ceil(2w/64) workgroups of 64, box_rows over ceil(h/64).
// Keep Params in sync with src/kernels/box_means.rs.

struct Params {
    w: u32,
    h: u32,
    ry: u32,
    rx: u32,
    values_at: u32,
    valid_at: u32,
    scratch_at: u32,
    out_at: u32,
}
@group(0) @binding(0) var<uniform> p: Params;

@compute @workgroup_size(64)
fn box_columns(@builtin(global_invocation_id) id: vec3<u32>) {
    let t = id.x;
    if (t >= 2u * p.w) {
        return;
    }
    let plane = select(p.values_at, p.valid_at, t >= p.w);
    let into = p.scratch_at + select(0u, p.w * p.h, t >= p.w);
    let x = t % p.w;
    var acc = 0.0;
    var lo = 0u;
    var hi = 0u;
    for (var y = 0u; y < p.h; y++) {
        let y0 = select(0u, y - p.ry, y >= p.ry);
        let y1 = min(y + p.ry + 1u, p.h);
        while (hi < y1) {
            acc += src[plane + hi * p.w + x];
            hi++;
        }
        while (lo < y0) {
            acc -= src[plane + lo * p.w + x];
            lo++;
        }
        aux[into + y * p.w + x] = acc;
    }
}

@compute @workgroup_size(64)
fn box_rows(@builtin(global_invocation_id) id: vec3<u32>) {
    let y = id.x;
    if (y >= p.h) {
        return;
    }
    let n = p.w * p.h;
    let row = p.scratch_at + y * p.w;
    var sum = 0.0;
    var count = 0.0;
    var lo = 0u;
    var hi = 0u;
    for (var x = 0u; x < p.w; x++) {
        let x0 = select(0u, x - p.rx, x >= p.rx);
        let x1 = min(x + p.rx + 1u, p.w);
        while (hi < x1) {
            sum += aux[row + hi];
            count += aux[n + row + hi];
            hi++;
        }
        while (lo < x0) {
            sum -= aux[row + lo];
            count -= aux[n + row + lo];
            lo++;
        }
        var mean = 0.0;
        if (count > 0.5) {
            mean = sum / count;
        }
        dst[p.out_at + y * p.w + x] = mean;
    }
}
