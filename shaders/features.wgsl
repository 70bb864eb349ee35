// features.wgsl: the pixel classifier's 22 features put together on the GPU from the feature
// maps and the outputs of rank.wgsl, box_means.wgsl and columns.wgsl (the chain is
// segment::pixels::encode_features; the CPU twin is segment::pixels::pixel_features).
// Planes of n = w·h values. src (the current image): from plane MAPS the feature maps
// (phase symmetry, the mean beneath, coherence, orientation). dst (the next image): feature k in plane k as far as the other kernels wrote
// them, the mean over 1 mm in plane 4, the seven column features in planes 23..29 and the
// mean square over 1 mm in plane 31.
//   square:   dst plane 30 = src plane 21 squared
//   assemble: the rest of the features into dst planes 0..21 (the standard deviation, the
//             column features in the features' order, depth, phase symmetry, coherence and
//             its horizontal part); values that are not finite become 0
// One thread per pixel: ceil(n/64) workgroups of 64 (in x, then y beyond the limit).
// Keep Params and the planes in sync with src/kernels/features.rs.

struct Params {
    w: u32,
    n: u32,
    // Depth feature per row (mm per row / the depth scale).
    depth_step: f32,
    stride: u32,
}
@group(0) @binding(0) var<uniform> p: Params;

const MAPS: u32 = 24u;
const COLUMNS: u32 = 23u;
const SQUARE: u32 = 30u;
const MEAN_SQUARE: u32 = 31u;
const PI: f32 = 3.14159265358979;
const HALF_PI: f32 = 1.57079632679490;
// Above every finite f32: NaN and infinities fail `abs(v) <= LARGEST`.
const LARGEST: f32 = 3.4028235e38;

fn pixel(id: vec3<u32>) -> u32 {
    return id.y * p.stride + id.x;
}

// |cos θ| as segment::pixels::abs_cos: the Taylor series to the 8th power after folding.
fn abs_cos(theta: f32) -> f32 {
    var t = abs(theta) % PI;
    if (t > HALF_PI) {
        t = PI - t;
    }
    let t2 = t * t;
    let c = 1.0 - t2 / 2.0 * (1.0 - t2 / 12.0 * (1.0 - t2 / 30.0 * (1.0 - t2 / 56.0)));
    return clamp(c, 0.0, 1.0);
}

fn finite_or_zero(v: f32) -> f32 {
    return select(0.0, v, abs(v) <= LARGEST);
}

@compute @workgroup_size(64)
fn square(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = pixel(id);
    if (i >= p.n) {
        return;
    }
    let u = src[21u * p.n + i];
    dst[SQUARE * p.n + i] = u * u;
}

@compute @workgroup_size(64)
fn assemble(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = pixel(id);
    let n = p.n;
    if (i >= n) {
        return;
    }
    let mean = dst[4u * n + i];
    dst[4u * n + i] = sqrt(max(dst[MEAN_SQUARE * n + i] - mean * mean, 0.0));
    // Column features 0..6 (above mean, below mean, below from 1 mm, above all, maximum
    // above, maximum below, ridge) into their feature planes.
    dst[7u * n + i] = dst[(COLUMNS + 0u) * n + i];
    dst[8u * n + i] = dst[(COLUMNS + 1u) * n + i];
    dst[9u * n + i] = dst[(COLUMNS + 4u) * n + i];
    dst[10u * n + i] = dst[(COLUMNS + 5u) * n + i];
    dst[11u * n + i] = dst[(COLUMNS + 2u) * n + i];
    dst[17u * n + i] = dst[(COLUMNS + 3u) * n + i];
    dst[18u * n + i] = dst[(COLUMNS + 6u) * n + i];
    dst[12u * n + i] = f32(i / p.w) * p.depth_step;
    dst[13u * n + i] = src[MAPS * n + i];
    let coherence = src[(MAPS + 2u) * n + i];
    dst[14u * n + i] = coherence;
    dst[15u * n + i] = coherence * abs_cos(src[(MAPS + 3u) * n + i]);
    for (var k = 0u; k < 22u; k++) {
        dst[k * n + i] = finite_or_zero(dst[k * n + i]);
    }
}
