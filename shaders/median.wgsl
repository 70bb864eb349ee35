// median.wgsl: median filter over a (2r+1)² window, r = 1 (3x3) or 2 (5x5).
// Bindings: src → dst. Dispatch: ceil(w/16) × ceil(h/16) workgroups of 16×16.
// Keep Params in sync with src/kernels/median.rs.

struct Params {
    width: u32,
    height: u32,
    radius: u32,
    pad0: u32,
}
@group(0) @binding(0) var<uniform> p: Params;

@compute @workgroup_size(16, 16)
fn median(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x >= p.width || id.y >= p.height) {
        return;
    }
    var v: array<f32, 25>;
    let r = i32(min(p.radius, 2u));
    var n = 0u;
    for (var dy = -r; dy <= r; dy++) {
        for (var dx = -r; dx <= r; dx++) {
            v[n] = load_src(i32(id.x) + dx, i32(id.y) + dy, p.width, p.height);
            n++;
        }
    }
    // Insertion sort: n ≤ 25.
    for (var i = 1u; i < n; i++) {
        let key = v[i];
        var j = i32(i) - 1;
        while (j >= 0 && v[j] > key) {
            v[j + 1] = v[j];
            j--;
        }
        v[j + 1] = key;
    }
    dst[id.y * p.width + id.x] = v[n / 2u];
}
