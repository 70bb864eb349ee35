// rank.wgsl: the rank transform of a plane of the current image over its valid pixels (the
// validity plane > 0.5, a value within ±BIG): each valid pixel's share of the valid pixels darker than it, read from a
// histogram of BINS bins between the valid minimum and maximum, linear within a bin; pixels
// that are not valid get 0. The pixel classifier's features are built on it (gain and
// dynamic range change the grey levels, not their order).
// Passes (CPU twin: src/kernels/rank.rs, which the pixel features use):
//   rank_minmax: p.groups workgroups of 256, each the minimum and maximum over a strided
//                share of the pixels → stats[PART + 2g], stats[PART + 2g + 1]
//   rank_hist:   p.groups workgroups: the range from those partials (workgroup 0 stores it at
//                stats[0] lo, stats[1] bin width), then the histogram of the workgroup's
//                share in workgroup memory (atomics) → stats[hist_at() + g·BINS + b]
//   rank_cdf:    one workgroup: each bin summed over the workgroups (exact: counts below
//                2^24), an inclusive scan, divided by the valid count → stats[cdf_at() + b]
//                for b in 0..=BINS (cdf[0] = 0)
//   rank_map:    ceil(width/16) × ceil(height/16) workgroups of 16×16: every pixel → dst;
//                run again with another values plane, it maps that plane through the same
//                histogram (the pixel features map the mean beneath so)
// Planes are value offsets into src (values_at, valid_at) and dst (out_at).
// Keep Params, BINS, PART and BIG in sync with src/kernels/rank.rs.

struct Params {
    width: u32,
    height: u32,
    groups: u32,
    values_at: u32,
    valid_at: u32,
    out_at: u32,
    pad0: u32,
    pad1: u32,
}
@group(0) @binding(0) var<uniform> p: Params;

const BINS: u32 = 1024u;
const PART: u32 = 4u;
// Values beyond ±BIG are not counted (as infinities); START is above any counted value.
const BIG: f32 = 3.0e38;
const START: f32 = 3.4e38;

var<workgroup> lo_part: array<f32, 256>;
var<workgroup> hi_part: array<f32, 256>;
var<workgroup> hist: array<atomic<u32>, 1024>;
var<workgroup> scan: array<f32, 256>;

fn hist_at() -> u32 {
    return PART + 2u * p.groups;
}

fn cdf_at() -> u32 {
    return hist_at() + p.groups * BINS;
}

// Valid and counted (NaN fails the comparison, infinities exceed BIG).
fn counted(i: u32) -> bool {
    return src[p.valid_at + i] > 0.5 && abs(src[p.values_at + i]) <= BIG;
}

fn value(i: u32) -> f32 {
    return src[p.values_at + i];
}

@compute @workgroup_size(256)
fn rank_minmax(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let n = p.width * p.height;
    var lo = START;
    var hi = -START;
    for (var i = wg.x * 256u + li; i < n; i += p.groups * 256u) {
        if (counted(i)) {
            lo = min(lo, value(i));
            hi = max(hi, value(i));
        }
    }
    lo_part[li] = lo;
    hi_part[li] = hi;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s = s / 2u) {
        if (li < s) {
            lo_part[li] = min(lo_part[li], lo_part[li + s]);
            hi_part[li] = max(hi_part[li], hi_part[li + s]);
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        stats[PART + 2u * wg.x] = lo_part[0];
        stats[PART + 2u * wg.x + 1u] = hi_part[0];
    }
}

@compute @workgroup_size(256)
fn rank_hist(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    for (var b = li; b < BINS; b += 256u) {
        atomicStore(&hist[b], 0u);
    }
    // The range, as the twin: an empty or flat image maps over 0..1.
    var lo = START;
    var hi = -START;
    for (var g = 0u; g < p.groups; g++) {
        lo = min(lo, stats[PART + 2u * g]);
        hi = max(hi, stats[PART + 2u * g + 1u]);
    }
    if (lo >= hi) {
        lo = 0.0;
        hi = 1.0;
    }
    let width = (hi - lo) / f32(BINS);
    if (wg.x == 0u && li == 0u) {
        stats[0] = lo;
        stats[1] = width;
    }
    workgroupBarrier();
    let n = p.width * p.height;
    for (var i = wg.x * 256u + li; i < n; i += p.groups * 256u) {
        if (counted(i)) {
            let b = min(u32((value(i) - lo) / width), BINS - 1u);
            atomicAdd(&hist[b], 1u);
        }
    }
    workgroupBarrier();
    for (var b = li; b < BINS; b += 256u) {
        stats[hist_at() + wg.x * BINS + b] = f32(atomicLoad(&hist[b]));
    }
}

@compute @workgroup_size(256)
fn rank_cdf(@builtin(local_invocation_index) li: u32) {
    // Four bins per thread.
    var c: array<f32, 4>;
    var mine = 0.0;
    for (var k = 0u; k < 4u; k++) {
        let b = li * 4u + k;
        var s = 0.0;
        for (var g = 0u; g < p.groups; g++) {
            s += stats[hist_at() + g * BINS + b];
        }
        c[k] = s;
        mine += s;
    }
    scan[li] = mine;
    workgroupBarrier();
    for (var off = 1u; off < 256u; off = off * 2u) {
        var v = scan[li];
        if (li >= off) {
            v += scan[li - off];
        }
        workgroupBarrier();
        scan[li] = v;
        workgroupBarrier();
    }
    let counted_all = scan[255];
    let total = select(1.0, counted_all, counted_all > 0.0);
    var run = scan[li] - mine;
    if (li == 0u) {
        stats[cdf_at()] = 0.0;
    }
    for (var k = 0u; k < 4u; k++) {
        run += c[k];
        stats[cdf_at() + li * 4u + k + 1u] = run / total;
    }
}

@compute @workgroup_size(16, 16)
fn rank_map(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x >= p.width || id.y >= p.height) {
        return;
    }
    let i = id.y * p.width + id.x;
    if (!counted(i)) {
        dst[p.out_at + i] = 0.0;
        return;
    }
    let t = clamp((value(i) - stats[0]) / stats[1], 0.0, f32(BINS));
    let b = min(u32(t), BINS - 1u);
    let f = t - f32(b);
    let c0 = stats[cdf_at() + b];
    let c1 = stats[cdf_at() + b + 1u];
    dst[p.out_at + i] = c0 + f * (c1 - c0);
}
