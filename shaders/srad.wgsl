// srad.wgsl: speckle-reducing anisotropic diffusion (Yu & Acton 2002), one iteration as three
// dispatches:
//   srad_partials (16×16 tiles, first iteration): each workgroup's Σ and Σ² of the input
//               over the ROI → stats[PARTIALS + 2·group ..], as srad_update leaves them
//   srad_reduce (1 workgroup of 256): q0² = var/mean² of the ROI from those partial sums
//               → stats[0] (a pass over one float pair per tile, not over the image)
//   srad_coeff  (16×16 tiles): diffusion coefficient c per pixel → aux
//   srad_update (16×16 tiles): J' = J + λ/4 (c·dN + c_S·dS + c·dW + c_E·dE) → dst, and each
//               workgroup's Σ and Σ² of J' over the ROI → stats[PARTIALS + 2·group ..]
// So the q0 statistics of an iteration cost one small dispatch, not a pass over the image.
// Intensities are floored at INTENSITY_FLOOR to keep the ratios finite in black shadows.
// Keep Params in sync with src/kernels/srad.rs.

struct Params {
    width: u32,
    height: u32,
    roi_x0: u32,
    roi_y0: u32,
    roi_w: u32,
    roi_h: u32,
    pad0: u32,
    pad1: u32,
    lambda: f32,
    pad2: f32,
    pad3: f32,
    pad4: f32,
}
@group(0) @binding(0) var<uniform> p: Params;

const INTENSITY_FLOOR: f32 = 1.0;
const Q0_FLOOR: f32 = 1e-6;
// Keep in sync with srad::PARTIALS_OFFSET.
const PARTIALS: u32 = 4u;

var<workgroup> part_sum: array<f32, 256>;
var<workgroup> part_sq: array<f32, 256>;

// Sums part_sum and part_sq of the 256 threads into element 0 (call from every thread).
fn tree_reduce(t: u32) {
    for (var stride = 128u; stride > 0u; stride = stride / 2u) {
        if (t < stride) {
            part_sum[t] += part_sum[t + stride];
            part_sq[t] += part_sq[t + stride];
        }
        workgroupBarrier();
    }
}

// The first iteration's partial sums: every tile's Σ and Σ² of the input over the ROI, in
// parallel over the whole frame (the later iterations get theirs from srad_update).
@compute @workgroup_size(16, 16)
fn srad_partials(@builtin(global_invocation_id) id: vec3<u32>,
                 @builtin(workgroup_id) wg: vec3<u32>,
                 @builtin(local_invocation_index) li: u32) {
    let in_roi = id.x < p.width && id.y < p.height && id.x >= p.roi_x0 && id.x < p.roi_x0 + p.roi_w && id.y >= p.roi_y0 && id.y < p.roi_y0 + p.roi_h;
    var v = 0.0;
    if (in_roi) {
        v = src[id.y * p.width + id.x];
    }
    write_partials(v, in_roi, wg, li);
}

// Writes this workgroup's Σ and Σ² of `v` over the threads with `counted` set.
fn write_partials(v: f32, counted: bool, wg: vec3<u32>, li: u32) {
    part_sum[li] = select(0.0, v, counted);
    part_sq[li] = select(0.0, v * v, counted);
    workgroupBarrier();
    tree_reduce(li);
    if (li == 0u) {
        let g = wg.y * ((p.width + 15u) / 16u) + wg.x;
        stats[PARTIALS + 2u * g] = part_sum[0];
        stats[PARTIALS + 2u * g + 1u] = part_sq[0];
    }
}

fn q0_squared(sum: f32, sq: f32, n: f32) -> f32 {
    let mean = sum / n;
    let variance = max(sq / n - mean * mean, 0.0);
    return max(variance / max(mean * mean, Q0_FLOOR), Q0_FLOOR);
}

@compute @workgroup_size(256)
fn srad_reduce(@builtin(local_invocation_index) t: u32) {
    let groups = ((p.width + 15u) / 16u) * ((p.height + 15u) / 16u);
    var s = 0.0;
    var q = 0.0;
    for (var g = t; g < groups; g += 256u) {
        s += stats[PARTIALS + 2u * g];
        q += stats[PARTIALS + 2u * g + 1u];
    }
    part_sum[t] = s;
    part_sq[t] = q;
    workgroupBarrier();
    tree_reduce(t);
    if (t == 0u) {
        stats[0] = q0_squared(part_sum[0], part_sq[0], f32(p.roi_w * p.roi_h));
    }
}

@compute @workgroup_size(16, 16)
fn srad_coeff(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x >= p.width || id.y >= p.height) {
        return;
    }
    let x = i32(id.x);
    let y = i32(id.y);
    let j = max(load_src(x, y, p.width, p.height), INTENSITY_FLOOR);
    let dn = max(load_src(x, y - 1, p.width, p.height), INTENSITY_FLOOR) - j;
    let ds = max(load_src(x, y + 1, p.width, p.height), INTENSITY_FLOOR) - j;
    let dw = max(load_src(x - 1, y, p.width, p.height), INTENSITY_FLOOR) - j;
    let de = max(load_src(x + 1, y, p.width, p.height), INTENSITY_FLOOR) - j;
    let g2 = (dn * dn + ds * ds + dw * dw + de * de) / (j * j);
    let l = (dn + ds + dw + de) / j;
    let num = 0.5 * g2 - 0.0625 * l * l;
    let den = (1.0 + 0.25 * l) * (1.0 + 0.25 * l);
    let q2 = num / den;
    let q02 = stats[0];
    let c = 1.0 / (1.0 + (q2 - q02) / (q02 * (1.0 + q02)));
    aux[id.y * p.width + id.x] = clamp(c, 0.0, 1.0);
}

@compute @workgroup_size(16, 16)
fn srad_update(@builtin(global_invocation_id) id: vec3<u32>,
               @builtin(workgroup_id) wg: vec3<u32>,
               @builtin(local_invocation_index) li: u32) {
    var v = 0.0;
    let inside = id.x < p.width && id.y < p.height;
    if (inside) {
        let x = i32(id.x);
        let y = i32(id.y);
        let w = p.width;
        let h = p.height;
        let j = max(load_src(x, y, w, h), INTENSITY_FLOOR);
        let dn = max(load_src(x, y - 1, w, h), INTENSITY_FLOOR) - j;
        let ds = max(load_src(x, y + 1, w, h), INTENSITY_FLOOR) - j;
        let dw = max(load_src(x - 1, y, w, h), INTENSITY_FLOOR) - j;
        let de = max(load_src(x + 1, y, w, h), INTENSITY_FLOOR) - j;
        let c = aux[clamp_index(x, y, w, h)];
        let cs = aux[clamp_index(x, y + 1, w, h)];
        let ce = aux[clamp_index(x + 1, y, w, h)];
        let d = c * dn + cs * ds + c * dw + ce * de;
        v = j + 0.25 * p.lambda * d;
        dst[id.y * w + id.x] = v;
    }
    // This workgroup's share of the next iteration's ROI statistics.
    let in_roi = inside && id.x >= p.roi_x0 && id.x < p.roi_x0 + p.roi_w && id.y >= p.roi_y0 && id.y < p.roi_y0 + p.roi_h;
    write_partials(v, in_roi, wg, li);
}
