// shadow.wgsl: mean intensity beneath each pixel, down its column: rows y+gap .. y+gap+length
// (clipped to the image; 0 where nothing lies beneath). Bone casts an acoustic shadow, so a
// bright pixel with a dark mean beneath is a bone candidate.
// Bindings: src → dst; aux holds the column prefix sums. Dispatch: ceil(w/64) workgroups of 64
// threads, one thread per column, rows in order (the same order of additions as the twin).
// Keep Params in sync with src/kernels/shadow.rs.

struct Params {
    width: u32,
    height: u32,
    gap: u32,
    length: u32,
}
@group(0) @binding(0) var<uniform> p: Params;

@compute @workgroup_size(64)
fn shadow(@builtin(global_invocation_id) id: vec3<u32>) {
    let x = id.x;
    if (x >= p.width) {
        return;
    }
    let w = p.width;
    let h = p.height;
    // aux[y·w + x] = Σ src over rows < y (exclusive prefix).
    var total = 0.0;
    for (var y = 0u; y < h; y++) {
        aux[y * w + x] = total;
        total += src[y * w + x];
    }
    for (var y = 0u; y < h; y++) {
        let start = min(y + p.gap, h);
        let end = min(y + p.gap + p.length, h);
        var below = 0.0;
        if (end > start) {
            var hi = total;
            if (end < h) {
                hi = aux[end * w + x];
            }
            below = (hi - aux[start * w + x]) / f32(end - start);
        }
        dst[y * w + x] = below;
    }
}
