// columns.wgsl: the pixel features that look up and down the beam (segment::pixels; CPU twin
// src/kernels/columns.rs), one thread per column. With v = value × validity:
//   0 the mean of v over the valid pixels d3 to d05 rows above (the rows y−d3 .. y−d05),
//   1 the same d05 to d3 rows below, 2 from d1 rows below to the bottom, 3 everything above;
//   4 the largest v from the top to d1 rows above (0 for the first d1 rows);
//   5 the largest v d05 to d8 rows below (clipped to the image; none: 0);
//   6 the ridge: v − (v d1 rows above + v d1 rows below) / 2, edges clamped.
// Means come from prefix sums (of v and of the validity) run down the column in f32 in the
// twin's order, so that they round as the CPU's do; only the divisions may differ (by an ULP
// where a GPU's division is not correctly rounded).
// src: the values (a plane at values_at) and the validity, 1 or 0 (at valid_at). aux: the
// prefix sums, two planes of (h + 1)·w from scratch_at, then three planes of maxima. dst: the seven features, plane after
// plane from out_at. Offsets are in values.
// Dispatch: ceil(w/64) workgroups of 64. Keep Params in sync with src/kernels/columns.rs.

struct Params {
    w: u32,
    h: u32,
    d05: u32,
    d1: u32,
    d3: u32,
    d8: u32,
    values_at: u32,
    valid_at: u32,
    scratch_at: u32,
    out_at: u32,
    pad0: u32,
    pad1: u32,
}
@group(0) @binding(0) var<uniform> p: Params;

// The mean of v over the valid pixels of rows a..b (half-open, clamped to the column).
fn column_mean(x: u32, a: i32, b: i32) -> f32 {
    let h = i32(p.h);
    let lo = u32(clamp(a, 0, h));
    let hi = u32(clamp(b, 0, h));
    let sums = p.scratch_at;
    let counts = sums + (p.h + 1u) * p.w;
    let count = aux[counts + hi * p.w + x] - aux[counts + lo * p.w + x];
    if (hi <= lo || count <= 0.0) {
        return 0.0;
    }
    return (aux[sums + hi * p.w + x] - aux[sums + lo * p.w + x]) / count;
}

fn value(x: u32, y: u32) -> f32 {
    return src[p.values_at + y * p.w + x] * src[p.valid_at + y * p.w + x];
}

@compute @workgroup_size(64)
fn columns(@builtin(global_invocation_id) id: vec3<u32>) {
    let x = id.x;
    if (x >= p.w) {
        return;
    }
    let n = p.w * p.h;
    let sums = p.scratch_at;
    let counts = sums + (p.h + 1u) * p.w;
    var s = 0.0;
    var c = 0.0;
    aux[sums + x] = 0.0;
    aux[counts + x] = 0.0;
    for (var y = 0u; y < p.h; y++) {
        s += value(x, y);
        c += src[p.valid_at + y * p.w + x];
        aux[sums + (y + 1u) * p.w + x] = s;
        aux[counts + (y + 1u) * p.w + x] = c;
    }
    // The maximum below by van Herk and Gil-Werman's blocks (no loop over each window: some
    // drivers cap a shader's loop iterations): maxima from each block's start and to each
    // block's end, blocks as long as a whole window, and from each row to the bottom (for
    // the windows the bottom cuts short).
    let last = p.h - 1u;
    let span = select(1u, p.d8 - p.d05 + 1u, p.d8 >= p.d05);
    let prefixes = counts + (p.h + 1u) * p.w;
    let suffixes = prefixes + n;
    let tails = suffixes + n;
    var block = 0.0;
    for (var y = 0u; y < p.h; y++) {
        let v = value(x, y);
        block = select(max(block, v), v, y % span == 0u);
        aux[prefixes + y * p.w + x] = block;
    }
    var tail = 0.0;
    for (var k = 0u; k < p.h; k++) {
        let y = last - k;
        let v = value(x, y);
        block = select(max(block, v), v, y == last || (y + 1u) % span == 0u);
        tail = select(max(tail, v), v, k == 0u);
        aux[suffixes + y * p.w + x] = block;
        aux[tails + y * p.w + x] = tail;
    }
    var running = 0.0;
    let h = i32(p.h);
    for (var y = 0u; y < p.h; y++) {
        let yi = i32(y);
        let o = p.out_at + y * p.w + x;
        dst[o] = column_mean(x, yi - i32(p.d3), yi - i32(p.d05) + 1);
        dst[n + o] = column_mean(x, yi + i32(p.d05), yi + i32(p.d3) + 1);
        dst[2u * n + o] = column_mean(x, yi + i32(p.d1), h);
        dst[3u * n + o] = column_mean(x, 0, yi);
        var above = 0.0;
        if (y >= p.d1) {
            running = max(running, value(x, y - p.d1));
            above = running;
        }
        dst[4u * n + o] = above;
        let lo = y + p.d05;
        let hi = min(y + p.d8, last);
        var below = 0.0;
        if (lo <= hi) {
            if (y + p.d8 >= last) {
                below = aux[tails + lo * p.w + x];
            } else {
                below = max(aux[suffixes + lo * p.w + x], aux[prefixes + hi * p.w + x]);
            }
        }
        dst[5u * n + o] = below;
        let up = value(x, select(0u, y - p.d1, y >= p.d1));
        let down = value(x, min(y + p.d1, last));
        dst[6u * n + o] = value(x, y) - 0.5 * (up + down);
    }
}
