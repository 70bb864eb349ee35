// obnlm.wgsl: optimized Bayesian non-local means for speckle (Coupé et al. 2009), pixelwise.
// For pixel i and each j in the (2S+1)² search window:
//   d(i,j) = Σ_k (u(i+k) − u(j+k))² / max(u(j+k), PEARSON_FLOOR)   over the (2P+1)² patch
//   w(i,j) = exp(−d / (h² · |patch|)); the centre weighs as the largest other weight;
//   out = Σ w u(j) / Σ w.
// A 16×16 workgroup loads its tile plus an apron of S+P pixels into workgroup memory once
// (clamped to edge) and reads every patch from there.
// Bindings: src → dst. Dispatch: ceil(w/16) × ceil(h/16) workgroups of 16×16.
// Limits: S + P ≤ 13 (the tile is 42×42). Keep Params in sync with src/kernels/obnlm.rs.

struct Params {
    width: u32,
    height: u32,
    search_radius: u32,
    patch_radius: u32,
    h: f32,
    pad0: f32,
    pad1: f32,
    pad2: f32,
}
@group(0) @binding(0) var<uniform> p: Params;

const PEARSON_FLOOR: f32 = 1.0;
const MAX_APRON: u32 = 13u;
const TILE: u32 = 42u; // 16 + 2 · MAX_APRON

var<workgroup> tile: array<f32, 1764>;

@compute @workgroup_size(16, 16)
fn obnlm(@builtin(global_invocation_id) id: vec3<u32>,
         @builtin(workgroup_id) wg: vec3<u32>,
         @builtin(local_invocation_index) li: u32) {
    let apron = min(p.search_radius + p.patch_radius, MAX_APRON);
    let side = 16u + 2u * apron;
    let ox = i32(wg.x * 16u) - i32(apron);
    let oy = i32(wg.y * 16u) - i32(apron);
    for (var i = li; i < side * side; i += 256u) {
        let tx = i32(i % side);
        let ty = i32(i / side);
        tile[u32(ty) * TILE + u32(tx)] = load_src(ox + tx, oy + ty, p.width, p.height);
    }
    workgroupBarrier();
    if (id.x >= p.width || id.y >= p.height) {
        return;
    }
    let s = i32(min(p.search_radius, apron));
    let pr = i32(min(p.patch_radius, apron - u32(s)));
    let cx = i32(id.x) - ox;
    let cy = i32(id.y) - oy;
    let npatch = f32((2 * pr + 1) * (2 * pr + 1));
    let inv = 1.0 / (p.h * p.h * npatch);
    var wsum = 0.0;
    var vsum = 0.0;
    var wmax = 0.0;
    for (var sy = -s; sy <= s; sy++) {
        for (var sx = -s; sx <= s; sx++) {
            if (sx == 0 && sy == 0) {
                continue;
            }
            var d = 0.0;
            for (var ky = -pr; ky <= pr; ky++) {
                for (var kx = -pr; kx <= pr; kx++) {
                    let a = tile[u32(cy + ky) * TILE + u32(cx + kx)];
                    let b = tile[u32(cy + sy + ky) * TILE + u32(cx + sx + kx)];
                    let diff = a - b;
                    d += diff * diff / max(b, PEARSON_FLOOR);
                }
            }
            let w = exp(-d * inv);
            wsum += w;
            vsum += w * tile[u32(cy + sy) * TILE + u32(cx + sx)];
            wmax = max(wmax, w);
        }
    }
    // The centre pixel counts with the largest weight any other pixel got.
    let centre = tile[u32(cy) * TILE + u32(cx)];
    if (wmax <= 0.0) {
        wmax = 1.0;
    }
    wsum += wmax;
    vsum += wmax * centre;
    dst[id.y * p.width + id.x] = vsum / wsum;
}
