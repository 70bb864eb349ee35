//! Median filter, 3x3 or 5x5 (radius 1 or 2): the middle value of the window, edges clamped.
//! Shader: `shaders/median.wgsl`.

use ndarray::Array2;

use super::{at, check_image, par_image};

/// Parameters; keep in sync with `Params` in shaders/median.wgsl.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    /// Columns (set by the dispatcher).
    pub width: u32,
    /// Rows (set by the dispatcher).
    pub height: u32,
    /// Window radius: 1 (3x3) or 2 (5x5).
    pub radius: u32,
    /// Padding to 16 bytes.
    pub pad0: u32,
}

impl Params {
    /// A `size` × `size` median (3 or 5).
    pub fn new(size: u32) -> crate::Result<Params> {
        if size != 3 && size != 5 {
            return Err(crate::Error::InvalidParameter { name: "size", reason: format!("{size} (median sizes: 3, 5)") });
        }
        Ok(Params { width: 0, height: 0, radius: size / 2, pad0: 0 })
    }
}

/// The shader's source.
pub const SHADER: &str = include_str!("../../shaders/median.wgsl");

/// CPU twin.
pub fn cpu(img: &Array2<f32>, params: &Params) -> crate::Result<Array2<f32>> {
    check_image("median", img)?;
    let r = params.radius.min(2) as isize;
    let (h, w) = img.dim();
    Ok(par_image(h, w, |x, y| {
        let mut v = [0f32; 25];
        let mut n = 0;
        for dy in -r..=r {
            for dx in -r..=r {
                v[n] = at(img, x as isize + dx, y as isize + dy);
                n += 1;
            }
        }
        for i in 1..n {
            let key = v[i];
            let mut j = i as isize - 1;
            while j >= 0 && v[j as usize] > key {
                v[j as usize + 1] = v[j as usize];
                j -= 1;
            }
            v[(j + 1) as usize] = key;
        }
        v[n / 2]
    }))
}

/// Queues the kernel on a GPU chain.
#[cfg(feature = "gpu")]
pub fn encode(chain: &mut crate::gpu::GpuChain<'_>, params: &Params) -> crate::Result<()> {
    let mut p = *params;
    p.width = chain.width() as u32;
    p.height = chain.height() as u32;
    let g = chain.groups_2d();
    chain.dispatch("median", SHADER, "median", &p, g, true)?;
    Ok(())
}
