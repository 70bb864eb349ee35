// pixel_mlp.wgsl: the pixel classifier (src/kernels/pixel_mlp.rs) on every pixel: standardise the
// feature vector, dense layers with ReLU between them, softmax over the classes.
// Bindings: src holds the features, feature-major (src[k·n + i] is feature k of pixel i);
// aux holds the model from aux[model]: mean[F], scale[F], then per layer its weights (outputs
// × inputs, row-major) and biases. dst receives the probabilities, class-major, from plane
// out_plane (dst[(out_plane + c)·n + i]).
// Inputs split between two buffers (the chained classifier, src/segment/context.rs): inputs
// below `split` are src planes, the rest are dst planes from ctx_plane (the second stage's
// context, written into dst by shaders/context.wgsl). The single-stage use has split = F.
// Dispatch: workgroups of 64 threads, one thread per pixel, as many rows of workgroups as
// the per-dimension limit needs. Keep Params in sync with src/kernels/pixel_mlp.rs.

struct Params {
    n: u32,
    layers: u32,
    features: u32,
    classes: u32,
    // Layer widths, inputs first: width0 = features, width[layers] = classes.
    width0: u32,
    width1: u32,
    width2: u32,
    width3: u32,
    width4: u32,
    width5: u32,
    width6: u32,
    width7: u32,
    // Where the model starts in aux, which input is the first read from dst, the dst plane of
    // that input, and the dst plane of the first output.
    model: u32,
    split: u32,
    ctx_plane: u32,
    out_plane: u32,
}
@group(0) @binding(0) var<uniform> p: Params;

// The widest layer the host accepts (pixel_mlp::MAX_WIDTH).
const MAX_WIDTH: u32 = 64u;

fn width_of(i: u32) -> u32 {
    var widths = array<u32, 8>(
        p.width0, p.width1, p.width2, p.width3, p.width4, p.width5, p.width6, p.width7
    );
    return widths[i];
}

@compute @workgroup_size(64)
fn pixel_mlp(
    @builtin(global_invocation_id) id: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    let i = id.y * groups.x * 64u + id.x;
    if (i >= p.n) {
        return;
    }
    var a: array<f32, MAX_WIDTH>;
    var b: array<f32, MAX_WIDTH>;
    let f = p.features;
    let m0 = p.model;
    for (var k = 0u; k < f; k++) {
        var x: f32;
        if (k < p.split) {
            x = src[k * p.n + i];
        } else {
            x = dst[(p.ctx_plane + k - p.split) * p.n + i];
        }
        a[k] = (x - aux[m0 + k]) * aux[m0 + f + k];
    }
    var off = m0 + 2u * f;
    for (var l = 0u; l < p.layers; l++) {
        let ins = width_of(l);
        let outs = width_of(l + 1u);
        let last = l + 1u == p.layers;
        for (var o = 0u; o < outs; o++) {
            var s = aux[off + outs * ins + o];
            for (var j = 0u; j < ins; j++) {
                s += aux[off + o * ins + j] * a[j];
            }
            if (!last) {
                s = max(s, 0.0);
            }
            b[o] = s;
        }
        for (var o = 0u; o < outs; o++) {
            a[o] = b[o];
        }
        off += outs * ins + outs;
    }
    var m = a[0];
    for (var c = 1u; c < p.classes; c++) {
        m = max(m, a[c]);
    }
    var sum = 0.0;
    for (var c = 0u; c < p.classes; c++) {
        a[c] = exp(a[c] - m);
        sum += a[c];
    }
    for (var c = 0u; c < p.classes; c++) {
        dst[(p.out_plane + c) * p.n + i] = a[c] / sum;
    }
}
