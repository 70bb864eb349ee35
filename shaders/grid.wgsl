// grid.wgsl: the analysis grid at half resolution: the mean of every 2x2 block of the
// despeckled region, written packed (out_width per row) at the start of dst, so that a chain
// can hand it over to a buffer set of the grid's size. Odd last rows and columns are left out.
// Sums in the CPU twin's order (src/kernels/grid.rs): top left, bottom left, top right,
// bottom right.
// Dispatch: ceil(out_width/16) × ceil(out_height/16) workgroups of 16×16.
// Keep Params in sync with src/kernels/grid.rs.

struct Params {
    width: u32,
    height: u32,
    out_width: u32,
    out_height: u32,
}
@group(0) @binding(0) var<uniform> p: Params;

@compute @workgroup_size(16, 16)
fn half_sample(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x >= p.out_width || id.y >= p.out_height) {
        return;
    }
    let i = 2u * id.y * p.width + 2u * id.x;
    let s = src[i] + src[i + p.width] + src[i + 1u] + src[i + p.width + 1u];
    dst[id.y * p.out_width + id.x] = 0.25 * s;
}
