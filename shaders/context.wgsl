// context.wgsl: the pixel classifier's second-stage context inputs (src/kernels/context.rs;
// segment::context::context_features is the CPU twin) from the first stage's probabilities, without leaving the
// GPU: the probabilities on the valid pixels, their means over the valid pixels of a near and
// a far window (windows clipped at the grid's edges; no valid pixel: 0), and for five labels
// the near mean read `dy` rows above and below and the smaller and larger of the reads `dx`
// columns to either side (outside the grid: 0).
// Planes of n = w·h values. src: the validity (1 or 0) at plane valid_plane. dst: the first
// stage's probabilities at planes probs_plane.., the context written from plane ctx_plane:
// C probabilities, C near means, C far means, then per offset label above, below, side min,
// side max. aux from `scratch`: row sums, C near, C far, then the valid count near and far.
// Three passes: context_rows (row sums, a thread per row and plane), context_columns (window
// means, a thread per column and plane), context_offsets (a thread per pixel). Dispatch:
// workgroups of 64 threads in as many rows of workgroups as the per-dimension limit needs. Keep Params in sync with src/kernels/context.rs.

struct Params {
    w: u32,
    h: u32,
    n: u32,
    classes: u32,
    near_ry: u32,
    near_rx: u32,
    far_ry: u32,
    far_rx: u32,
    dy: u32,
    dx: u32,
    valid_plane: u32,
    probs_plane: u32,
    ctx_plane: u32,
    scratch: u32,
    label0: u32,
    label1: u32,
    label2: u32,
    label3: u32,
    label4: u32,
    pad0: u32,
}
@group(0) @binding(0) var<uniform> p: Params;

fn pixel_index(id: vec3<u32>, groups: vec3<u32>) -> u32 {
    return id.y * groups.x * 64u + id.x;
}

// The window sums are running sums in the CPU twin's order (pixels::horizontal_sums and
// vertical_sums: add the entering values, then subtract the leaving ones), one thread per row
// or column and plane, so that they round as the CPU's do.

// Row pass: thread t = q·h + y. Planes q: C near sums, C far sums (the probabilities times the
// validity), then the valid count near and far; the near threads also write the masked
// probabilities (the context's first C planes).
@compute @workgroup_size(64)
fn context_rows(
    @builtin(global_invocation_id) id: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    let t = pixel_index(id, groups);
    let planes = 2u * p.classes + 2u;
    if (t >= planes * p.h) {
        return;
    }
    let q = t / p.h;
    let y = t % p.h;
    let counts = q >= 2u * p.classes;
    let near = select(q < p.classes, q == 2u * p.classes, counts);
    let c = select(q % p.classes, 0u, counts);
    let r = select(p.far_rx, p.near_rx, near);
    let row = y * p.w;
    let valid = p.valid_plane * p.n + row;
    let probs = (p.probs_plane + c) * p.n + row;
    let out = p.scratch + q * p.n + row;
    let masked = (p.ctx_plane + c) * p.n + row;
    let write_masked = near && !counts;
    var acc = 0.0;
    var lo = 0u;
    var hi = 0u;
    for (var x = 0u; x < p.w; x++) {
        let x0 = select(0u, x - r, x >= r);
        let x1 = min(x + r + 1u, p.w);
        while (hi < x1) {
            acc += select(dst[probs + hi] * src[valid + hi], src[valid + hi], counts);
            hi++;
        }
        while (lo < x0) {
            acc -= select(dst[probs + lo] * src[valid + lo], src[valid + lo], counts);
            lo++;
        }
        aux[out + x] = acc;
        if (write_masked) {
            dst[masked + x] = dst[probs + x] * src[valid + x];
        }
    }
}

// A window's mean over its valid pixels (none: 0), as pixels::share_mean.
fn share_mean(sum: f32, count: f32) -> f32 {
    if (count > 0.5) {
        return sum / count;
    }
    return 0.0;
}

// Column pass: thread t = q·w + x, q < 2C (near, then far, per class): the running sums down
// the column of the row sums and of the valid counts, and their quotient.
@compute @workgroup_size(64)
fn context_columns(
    @builtin(global_invocation_id) id: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    let t = pixel_index(id, groups);
    if (t >= 2u * p.classes * p.w) {
        return;
    }
    let q = t / p.w;
    let x = t % p.w;
    let near = q < p.classes;
    let r = select(p.far_ry, p.near_ry, near);
    let sums = p.scratch + q * p.n + x;
    let counts = p.scratch + select(2u * p.classes + 1u, 2u * p.classes, near) * p.n + x;
    // The context's near means follow its masked probabilities, the far means the near ones.
    let out = (p.ctx_plane + p.classes + q) * p.n + x;
    var acc = 0.0;
    var count = 0.0;
    var lo = 0u;
    var hi = 0u;
    for (var y = 0u; y < p.h; y++) {
        let y0 = select(0u, y - r, y >= r);
        let y1 = min(y + r + 1u, p.h);
        while (hi < y1) {
            acc += aux[sums + hi * p.w];
            count += aux[counts + hi * p.w];
            hi++;
        }
        while (lo < y0) {
            acc -= aux[sums + lo * p.w];
            count -= aux[counts + lo * p.w];
            lo++;
        }
        dst[out + y * p.w] = share_mean(acc, count);
    }
}

// The near mean of class `k` at (x, y), or 0 outside the grid.
fn near_at(k: u32, x: i32, y: i32) -> f32 {
    if (x < 0 || y < 0 || x >= i32(p.w) || y >= i32(p.h)) {
        return 0.0;
    }
    return dst[(p.ctx_plane + p.classes + k) * p.n + u32(y) * p.w + u32(x)];
}

@compute @workgroup_size(64)
fn context_offsets(
    @builtin(global_invocation_id) id: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    let i = pixel_index(id, groups);
    if (i >= p.n) {
        return;
    }
    let y = i32(i / p.w);
    let x = i32(i % p.w);
    let dy = i32(p.dy);
    let dx = i32(p.dx);
    let labels = array<u32, 5>(p.label0, p.label1, p.label2, p.label3, p.label4);
    for (var j = 0u; j < 5u; j++) {
        let k = labels[j];
        let base = p.ctx_plane + 3u * p.classes + 4u * j;
        let l = near_at(k, x - dx, y);
        let r = near_at(k, x + dx, y);
        dst[base * p.n + i] = near_at(k, x, y - dy);
        dst[(base + 1u) * p.n + i] = near_at(k, x, y + dy);
        dst[(base + 2u) * p.n + i] = min(l, r);
        dst[(base + 3u) * p.n + i] = max(l, r);
    }
}
