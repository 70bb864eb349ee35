// phase_symmetry.wgsl: Kovesi's phase symmetry from a log-Gabor bank, with FFTs done here.
// Its own bind group layout (keep in sync with FFT_LAYOUT in src/gpu/context.rs); this file
// does not use common.wgsl's bindings 2–4, only `src` and the helpers:
//   0 uniform Params, 1 src image (read), 5 dst image (write), 6 spectrum, 7 work (complex,
//   padded), 8 accum: energy [0, N), numerator [N, 2N), amplitude [2N, 3N), threshold at 3N,
//   per-workgroup partial sums from 3N + 4.
//   9 bank: the log-Gabor filters, one padded plane per (orientation, scale), filled by
//   ps_bank when the size or the filters change, and kept.
// Per frame: ps_load; ps_fft_rows_spectrum, ps_fft_cols_spectrum (forward); then for each
// orientation o and scale s: ps_filter, ps_fft_rows_work, ps_fft_cols_work (inverse),
// ps_accumulate; after each orientation's scales: ps_threshold, ps_orient; last: ps_finish.
// FFT dispatch: one workgroup of 256 threads per row (or column), in-place radix-2
// decimation in time in workgroup memory; sides are powers of two up to 1024.
// Keep Params in sync with src/kernels/phase_symmetry.rs.

struct Params {
    width: u32,
    height: u32,
    pad_width: u32,
    pad_height: u32,
    scales: u32,
    orientations: u32,
    scale: u32,
    orientation: u32,
    min_wavelength: f32,
    mult: f32,
    sigma_on_f: f32,
    theta_on_sigma: f32,
    noise_k: f32,
    pad0: f32,
    pad1: f32,
    pad2: f32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(5) var<storage, read_write> out_image: array<f32>;
@group(0) @binding(6) var<storage, read_write> spectrum: array<vec2<f32>>;
@group(0) @binding(7) var<storage, read_write> work: array<vec2<f32>>;
@group(0) @binding(8) var<storage, read_write> accum: array<f32>;
@group(0) @binding(9) var<storage, read_write> bank: array<f32>;

const PI: f32 = 3.14159265358979;
const EPSILON: f32 = 1e-3;

var<workgroup> line: array<vec2<f32>, 1024>;
var<workgroup> part: array<f32, 256>;

fn bit_reverse(i: u32, bits: u32) -> u32 {
    return reverseBits(i) >> (32u - bits);
}

// In-place FFT of line[0..n): forward (sign −1) or inverse (+1), unnormalised.
fn fft_line(n: u32, sign: f32, li: u32) {
    let bits = countTrailingZeros(n);
    for (var s = 1u; s <= bits; s++) {
        let m = 1u << s;
        let half = m >> 1u;
        for (var k = li; k < n / 2u; k += 256u) {
            let j = k % half;
            let i1 = (k / half) * m + j;
            let i2 = i1 + half;
            let angle = sign * 2.0 * PI * f32(j) / f32(m);
            let tw = vec2<f32>(cos(angle), sin(angle));
            let b = line[i2];
            let t = vec2<f32>(b.x * tw.x - b.y * tw.y, b.x * tw.y + b.y * tw.x);
            let a = line[i1];
            line[i1] = a + t;
            line[i2] = a - t;
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(16, 16)
fn ps_load(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x >= p.pad_width || id.y >= p.pad_height) {
        return;
    }
    spectrum[id.y * p.pad_width + id.x] = vec2<f32>(load_src(i32(id.x), i32(id.y), p.width, p.height), 0.0);
    if (id.x < p.width && id.y < p.height) {
        let n = p.width * p.height;
        let i = id.y * p.width + id.x;
        accum[n + i] = 0.0;
        accum[2u * n + i] = 0.0;
    }
}

@compute @workgroup_size(256)
fn ps_fft_rows_spectrum(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let n = p.pad_width;
    let bits = countTrailingZeros(n);
    let base = wg.y * n;
    for (var i = li; i < n; i += 256u) {
        line[bit_reverse(i, bits)] = spectrum[base + i];
    }
    workgroupBarrier();
    fft_line(n, -1.0, li);
    for (var i = li; i < n; i += 256u) {
        spectrum[base + i] = line[i];
    }
}

@compute @workgroup_size(256)
fn ps_fft_cols_spectrum(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let n = p.pad_height;
    let bits = countTrailingZeros(n);
    let x = wg.x;
    for (var i = li; i < n; i += 256u) {
        line[bit_reverse(i, bits)] = spectrum[i * p.pad_width + x];
    }
    workgroupBarrier();
    fft_line(n, -1.0, li);
    for (var i = li; i < n; i += 256u) {
        spectrum[i * p.pad_width + x] = line[i];
    }
}

@compute @workgroup_size(256)
fn ps_fft_rows_work(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let n = p.pad_width;
    let bits = countTrailingZeros(n);
    let base = wg.y * n;
    for (var i = li; i < n; i += 256u) {
        line[bit_reverse(i, bits)] = work[base + i];
    }
    workgroupBarrier();
    fft_line(n, 1.0, li);
    for (var i = li; i < n; i += 256u) {
        work[base + i] = line[i];
    }
}

@compute @workgroup_size(256)
fn ps_fft_cols_work(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let n = p.pad_height;
    let bits = countTrailingZeros(n);
    let x = wg.x;
    for (var i = li; i < n; i += 256u) {
        line[bit_reverse(i, bits)] = work[i * p.pad_width + x];
    }
    workgroupBarrier();
    fft_line(n, 1.0, li);
    for (var i = li; i < n; i += 256u) {
        work[i * p.pad_width + x] = line[i];
    }
}

// The same expression as phase_symmetry::log_gabor.
fn log_gabor(u: u32, v: u32) -> f32 {
    let pw = f32(p.pad_width);
    let ph = f32(p.pad_height);
    var fx = f32(u);
    if (fx >= pw / 2.0) {
        fx = fx - pw;
    }
    fx = fx / pw;
    var fy = f32(v);
    if (fy >= ph / 2.0) {
        fy = fy - ph;
    }
    fy = fy / ph;
    let f = sqrt(fx * fx + fy * fy);
    if (f == 0.0) {
        return 0.0;
    }
    let f0 = 1.0 / (p.min_wavelength * pow(p.mult, f32(p.scale)));
    let ln_sigma = log(p.sigma_on_f);
    let lf = log(f / f0);
    let radial = exp(-(lf * lf) / (2.0 * ln_sigma * ln_sigma));
    let low_pass = 1.0 / (1.0 + pow(f / 0.45, 30.0));
    let angle = atan2(-fy, fx);
    let theta = f32(p.orientation) * PI / f32(p.orientations);
    var d = angle - theta;
    d = d - 2.0 * PI * floor((d + PI) / (2.0 * PI));
    let sigma_theta = PI / f32(p.orientations) / p.theta_on_sigma;
    let angular = exp(-(d * d) / (2.0 * sigma_theta * sigma_theta));
    return radial * low_pass * angular;
}

// The plane of filter (orientation, scale) in the bank.
fn bank_offset() -> u32 {
    return (p.orientation * p.scales + p.scale) * p.pad_width * p.pad_height;
}

// Fills the bank's plane of one filter; run only when the bank does not hold these filters
// for this size yet (the frames after reuse it).
@compute @workgroup_size(16, 16)
fn ps_bank(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x >= p.pad_width || id.y >= p.pad_height) {
        return;
    }
    bank[bank_offset() + id.y * p.pad_width + id.x] = log_gabor(id.x, id.y);
}

@compute @workgroup_size(16, 16)
fn ps_filter(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x >= p.pad_width || id.y >= p.pad_height) {
        return;
    }
    let i = id.y * p.pad_width + id.x;
    work[i] = spectrum[i] * bank[bank_offset() + i];
}

@compute @workgroup_size(16, 16)
fn ps_accumulate(@builtin(global_invocation_id) id: vec3<u32>,
                 @builtin(workgroup_id) wg: vec3<u32>,
                 @builtin(local_invocation_index) li: u32) {
    let inside = id.x < p.width && id.y < p.height;
    var amp = 0.0;
    if (inside) {
        let n = p.width * p.height;
        let i = id.y * p.width + id.x;
        let z = work[id.y * p.pad_width + id.x] / f32(p.pad_width * p.pad_height);
        amp = sqrt(z.x * z.x + z.y * z.y);
        accum[2u * n + i] += amp;
        let e = z.x - abs(z.y);
        if (p.scale == 0u) {
            accum[i] = e;
        } else {
            accum[i] += e;
        }
    }
    // The smallest scale's amplitude sums, for the noise threshold.
    part[li] = amp;
    workgroupBarrier();
    for (var stride = 128u; stride > 0u; stride = stride / 2u) {
        if (li < stride) {
            part[li] += part[li + stride];
        }
        workgroupBarrier();
    }
    if (li == 0u && p.scale == 0u) {
        let g = wg.y * ((p.width + 15u) / 16u) + wg.x;
        accum[3u * p.width * p.height + 4u + g] = part[0];
    }
}

@compute @workgroup_size(256)
fn ps_threshold(@builtin(local_invocation_index) li: u32) {
    let n = p.width * p.height;
    let groups = ((p.width + 15u) / 16u) * ((p.height + 15u) / 16u);
    var s = 0.0;
    for (var g = li; g < groups; g += 256u) {
        s += accum[3u * n + 4u + g];
    }
    part[li] = s;
    workgroupBarrier();
    for (var stride = 128u; stride > 0u; stride = stride / 2u) {
        if (li < stride) {
            part[li] += part[li + stride];
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        let mean_a0 = part[0] / f32(n);
        let tau = mean_a0 / sqrt(PI / 2.0);
        let inv = 1.0 / p.mult;
        let total_tau = tau * (1.0 - pow(inv, f32(p.scales))) / (1.0 - inv);
        let mean = total_tau * sqrt(PI / 2.0);
        let sigma = total_tau * sqrt((4.0 - PI) / 2.0);
        accum[3u * n] = mean + p.noise_k * sigma;
    }
}

@compute @workgroup_size(16, 16)
fn ps_orient(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x >= p.width || id.y >= p.height) {
        return;
    }
    let n = p.width * p.height;
    let i = id.y * p.width + id.x;
    accum[n + i] += max(accum[i] - accum[3u * n], 0.0);
}

@compute @workgroup_size(16, 16)
fn ps_finish(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x >= p.width || id.y >= p.height) {
        return;
    }
    let n = p.width * p.height;
    let i = id.y * p.width + id.x;
    out_image[i] = clamp(accum[n + i] / (accum[2u * n + i] + EPSILON), 0.0, 1.0);
}
