//! Phase symmetry (Kovesi 1997, "Symmetry and asymmetry from local phase"), the local-phase
//! feature used to find bone surfaces in ultrasound (Hacihaliloglu et al. 2009).
//!
//! A bank of log-Gabor filters, S scales × O orientations, is applied in the frequency domain
//! to the image padded (clamp to edge) to powers of two. Each filter is one-sided in angle, so
//! its response is complex: even part e (real), odd part o (imaginary). With polarity +1
//! (bright lines on a dark background, as bone is):
//!
//!   PS = Σ_o ⌊Σ_s (e − |o|) − T_o⌋ / (Σ_o Σ_s √(e² + o²) + ε)
//!
//! T_o, the noise threshold of orientation o, follows Kovesi: the smallest scale's amplitude is
//! taken as Rayleigh noise of parameter τ = mean/√(π/2), summed over scales as if it fell by
//! `mult` per scale, and T = mean + k·σ of that sum.
//!
//! Filter: radial exp(−(ln(f/f0))² / (2 ln(σ_f)²)) × low-pass 1/(1 + (f/0.45)^30), angular
//! exp(−Δθ² / (2σ_θ²)), σ_θ = π / O / `theta_on_sigma`, f in cycles per pixel, f0 = 1/λ.
//! Shader: `shaders/phase_symmetry.wgsl` (radix-2 FFTs in workgroup memory).

use std::f32::consts::PI;

use ndarray::Array2;
use rustfft::num_complex::Complex;

use rayon::prelude::*;

use super::check_image;
use crate::fft::fft2;

/// Largest padded side the GPU FFT handles (one row per workgroup in 8 KiB of shared memory).
pub const MAX_FFT_SIDE: usize = 1024;
/// ε in the denominator (amplitude units, grey levels).
pub const EPSILON: f32 = 1e-3;

/// Parameters; keep in sync with `Params` in shaders/phase_symmetry.wgsl.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    /// Columns (set by the dispatcher).
    pub width: u32,
    /// Rows (set by the dispatcher).
    pub height: u32,
    /// Padded columns (power of two, set by the dispatcher).
    pub pad_width: u32,
    /// Padded rows (power of two, set by the dispatcher).
    pub pad_height: u32,
    /// Number of scales S.
    pub scales: u32,
    /// Number of orientations O.
    pub orientations: u32,
    /// Scale and orientation of the current filter (set by the dispatcher).
    pub scale: u32,
    /// Orientation index (set by the dispatcher).
    pub orientation: u32,
    /// Wavelength of the smallest scale, px.
    pub min_wavelength: f32,
    /// Ratio between successive scales' wavelengths.
    pub mult: f32,
    /// σ_f of the radial log-Gabor, as a ratio to f0.
    pub sigma_on_f: f32,
    /// Angular spacing over σ_θ.
    pub theta_on_sigma: f32,
    /// k of the noise threshold.
    pub noise_k: f32,
    /// Padding.
    pub pad0: [f32; 3],
}

impl Params {
    /// A bank of `scales` × `orientations` filters, the smallest of wavelength
    /// `min_wavelength` px.
    pub fn new(scales: u32, orientations: u32, min_wavelength: f32) -> crate::Result<Params> {
        if !(1..=6).contains(&scales) || !(1..=8).contains(&orientations) {
            return Err(crate::kernels::KernelError::InvalidParameter {
                name: "scales/orientations",
                reason: format!("{scales}/{orientations} (1..6, 1..8)"),
            }
            .into());
        }
        if !(2.0..256.0).contains(&min_wavelength) {
            return Err(crate::kernels::KernelError::InvalidParameter {
                name: "min_wavelength",
                reason: format!("{min_wavelength} px (2..256)"),
            }
            .into());
        }
        Ok(Params {
            width: 0,
            height: 0,
            pad_width: 0,
            pad_height: 0,
            scales,
            orientations,
            scale: 0,
            orientation: 0,
            min_wavelength,
            mult: 2.0,
            sigma_on_f: 0.55,
            theta_on_sigma: 1.2,
            noise_k: 2.0,
            pad0: [0.0; 3],
        })
    }

    /// The parameters resolved for an image of `width` × `height`.
    pub fn resolved(&self, width: usize, height: usize) -> Params {
        let mut p = *self;
        p.width = width as u32;
        p.height = height as u32;
        p.pad_width = width.next_power_of_two() as u32;
        p.pad_height = height.next_power_of_two() as u32;
        p
    }
}

/// What names a filter bank: the padded size and the filters' parameters (FNV-1a over
/// them), not the frame size or the noise threshold, which the bank does not depend on.
#[cfg(feature = "gpu")]
fn bank_key(p: &Params) -> u64 {
    let mut q = *p;
    (q.width, q.height, q.scale, q.orientation, q.noise_k) = (0, 0, 0, 0, 0.0);
    bytemuck::bytes_of(&q)
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
}

/// The shader's stem (pipeline cache key and labels).
pub const NAME: &str = "phase_symmetry";
/// The shader's source.
pub const SHADER: &str = include_str!("../../shaders/phase_symmetry.wgsl");

/// The log-Gabor filter value at frequency bin (u, v) of a `pw` × `ph` transform, for scale
/// `s` and orientation `o` (the same expression as the shader's `log_gabor`).
#[inline]
pub fn log_gabor(p: &Params, u: usize, v: usize, s: u32, o: u32) -> f32 {
    let (pw, ph) = (p.pad_width as f32, p.pad_height as f32);
    // Signed frequencies in cycles per pixel.
    let fx = if u as f32 >= pw / 2.0 {
        u as f32 - pw
    } else {
        u as f32
    } / pw;
    let fy = if v as f32 >= ph / 2.0 {
        v as f32 - ph
    } else {
        v as f32
    } / ph;
    let f = (fx * fx + fy * fy).sqrt();
    if f == 0.0 {
        return 0.0;
    }
    let f0 = 1.0 / (p.min_wavelength * p.mult.powi(s as i32));
    let ln_sigma = p.sigma_on_f.ln();
    let lf = (f / f0).ln();
    let radial = (-(lf * lf) / (2.0 * ln_sigma * ln_sigma)).exp();
    let low_pass = 1.0 / (1.0 + (f / 0.45).powi(30));
    let angle = (-fy).atan2(fx);
    let theta = o as f32 * PI / p.orientations as f32;
    let mut d = angle - theta;
    // Wrap to (−π, π].
    d = d - 2.0 * PI * ((d + PI) / (2.0 * PI)).floor();
    let sigma_theta = PI / p.orientations as f32 / p.theta_on_sigma;
    let angular = (-(d * d) / (2.0 * sigma_theta * sigma_theta)).exp();
    radial * low_pass * angular
}

/// Noise threshold from the mean amplitude of the smallest scale.
pub fn noise_threshold(p: &Params, mean_amplitude: f32) -> f32 {
    let tau = mean_amplitude / (PI / 2.0).sqrt();
    let inv = 1.0 / p.mult;
    let total_tau = tau * (1.0 - inv.powi(p.scales as i32)) / (1.0 - inv);
    let mean = total_tau * (PI / 2.0).sqrt();
    let sigma = total_tau * ((4.0 - PI) / 2.0).sqrt();
    mean + p.noise_k * sigma
}

/// A prepared filter bank for one image size: the filters evaluated once, FFT plans made once.
/// The production CPU path; gives exactly the twin's values.
pub struct Plan {
    params: Params,
    filters: Vec<Vec<f32>>,
    forward: [std::sync::Arc<dyn rustfft::Fft<f32>>; 2],
    inverse: [std::sync::Arc<dyn rustfft::Fft<f32>>; 2],
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

impl Plan {
    /// Prepares the bank for images of `width` × `height`.
    pub fn new(params: &Params, width: usize, height: usize) -> Plan {
        let p = params.resolved(width, height);
        let (pw, ph) = (p.pad_width as usize, p.pad_height as usize);
        let filters = (0..p.orientations)
            .flat_map(|o| (0..p.scales).map(move |s| (o, s)))
            .map(|(o, s)| {
                (0..ph * pw)
                    .map(|i| log_gabor(&p, i % pw, i / pw, s, o))
                    .collect()
            })
            .collect();
        let mut planner = rustfft::FftPlanner::<f32>::new();
        Plan {
            params: p,
            filters,
            forward: [planner.plan_fft_forward(pw), planner.plan_fft_forward(ph)],
            inverse: [planner.plan_fft_inverse(pw), planner.plan_fft_inverse(ph)],
        }
    }

    /// Whether the plan was made with these (resolved) parameters.
    pub fn params_equal(&self, p: &Params) -> bool {
        bytemuck::bytes_of(&self.params) == bytemuck::bytes_of(p)
    }

    /// Whether the plan fits images of this size.
    pub fn fits(&self, width: usize, height: usize) -> bool {
        self.params.width as usize == width && self.params.height as usize == height
    }

    fn fft2(&self, data: &mut Array2<Complex<f32>>, inverse: bool) {
        let plans = if inverse {
            &self.inverse
        } else {
            &self.forward
        };
        data.axis_iter_mut(ndarray::Axis(0))
            .into_par_iter()
            .for_each(|mut row| {
                if let Some(s) = row.as_slice_mut() {
                    plans[0].process(s);
                }
            });
        data.axis_iter_mut(ndarray::Axis(1))
            .into_par_iter()
            .for_each(|mut col| {
                let mut buf: Vec<Complex<f32>> = col.iter().copied().collect();
                plans[1].process(&mut buf);
                col.iter_mut().zip(buf).for_each(|(d, s)| *d = s);
            });
    }

    /// One filter's response on the `h` × `w` image area: per pixel the even-minus-odd energy
    /// `e − |o|` and the amplitude, and the amplitudes' sum (f64, in row-major order).
    ///
    /// The inverse FFT runs rows first, then only the `w` columns that are kept, as the twin
    /// does (so the values are the same); each whole pass is one rustfft call, so the scratch
    /// space is allocated once per pass.
    fn response(
        &self,
        spec: &[Complex<f32>],
        filter: &[f32],
        w: usize,
        h: usize,
    ) -> (Vec<f32>, Vec<f32>, f64) {
        let (pw, ph) = (
            self.params.pad_width as usize,
            self.params.pad_height as usize,
        );
        let mut x: Vec<Complex<f32>> = spec.iter().zip(filter).map(|(a, g)| a * g).collect();
        self.inverse[0].process(&mut x);
        // Columns 0..w, transposed in tiles so that neither side is walked with a long stride.
        const TILE: usize = 32;
        let mut t = vec![Complex::new(0.0f32, 0.0); w * ph];
        for v0 in (0..ph).step_by(TILE) {
            for u0 in (0..w).step_by(TILE) {
                for v in v0..(v0 + TILE).min(ph) {
                    for u in u0..(u0 + TILE).min(w) {
                        t[u * ph + v] = x[v * pw + u];
                    }
                }
            }
        }
        drop(x);
        self.inverse[1].process(&mut t);
        let norm = 1.0 / (pw * ph) as f32;
        let mut even_odd = vec![0f32; w * h];
        let mut amplitude = vec![0f32; w * h];
        let mut sum_a = 0.0f64;
        for y0 in (0..h).step_by(TILE) {
            for u0 in (0..w).step_by(TILE) {
                for y in y0..(y0 + TILE).min(h) {
                    for u in u0..(u0 + TILE).min(w) {
                        let z = t[u * ph + y] * norm;
                        amplitude[y * w + u] = (z.re * z.re + z.im * z.im).sqrt();
                        even_odd[y * w + u] = z.re - z.im.abs();
                    }
                }
            }
        }
        for &a in &amplitude {
            sum_a += a as f64;
        }
        (even_odd, amplitude, sum_a)
    }

    /// The phase symmetry map of `img` (which must have the plan's size). The filters run in
    /// parallel, one task each; their responses are summed in the twin's order, so the result
    /// is the twin's to the bit.
    pub fn run(&self, img: &Array2<f32>) -> crate::Result<Array2<f32>> {
        check_image("phase_symmetry", img)?;
        let (h, w) = img.dim();
        if !self.fits(w, h) {
            return Err(crate::kernels::KernelError::InvalidParameter {
                name: "phase_symmetry",
                reason: format!("plan for another size than {w}x{h}"),
            }
            .into());
        }
        let p = &self.params;
        let (pw, ph) = (p.pad_width as usize, p.pad_height as usize);
        let mut spectrum = Array2::from_shape_fn((ph, pw), |(y, x)| {
            Complex::new(img[[y.min(h - 1), x.min(w - 1)]], 0.0f32)
        });
        self.fft2(&mut spectrum, false);
        let spec = spectrum
            .as_slice()
            .map(|s| s.to_vec())
            .unwrap_or_else(|| spectrum.iter().copied().collect());
        let responses: Vec<(Vec<f32>, Vec<f32>, f64)> = self
            .filters
            .par_iter()
            .map(|filter| self.response(&spec, filter, w, h))
            .collect();
        let mut numerator = vec![0f32; w * h];
        let mut amplitude = vec![0f32; w * h];
        for per_orientation in responses.chunks(p.scales as usize) {
            let mut energy = vec![0f32; w * h];
            for (even_odd, amp, _) in per_orientation {
                for (((e, a), &eo), &am) in energy
                    .iter_mut()
                    .zip(amplitude.iter_mut())
                    .zip(even_odd)
                    .zip(amp)
                {
                    *a += am;
                    *e += eo;
                }
            }
            let mean_a0 = (per_orientation[0].2 / (w * h) as f64) as f32;
            let t = noise_threshold(p, mean_a0);
            numerator
                .iter_mut()
                .zip(&energy)
                .for_each(|(n, e)| *n += (e - t).max(0.0));
        }
        numerator
            .iter_mut()
            .zip(&amplitude)
            .for_each(|(n, a)| *n = (*n / (a + EPSILON)).clamp(0.0, 1.0));
        Array2::from_shape_vec((h, w), numerator).map_err(|e| {
            crate::kernels::KernelError::InvalidParameter {
                name: "phase_symmetry",
                reason: e.to_string(),
            }
            .into()
        })
    }
}

/// CPU twin: the phase symmetry map, values in [0, 1].
pub fn cpu(img: &Array2<f32>, params: &Params) -> crate::Result<Array2<f32>> {
    check_image("phase_symmetry", img)?;
    let (h, w) = img.dim();
    let p = params.resolved(w, h);
    let (pw, ph) = (p.pad_width as usize, p.pad_height as usize);
    let mut spectrum = Array2::from_shape_fn((ph, pw), |(y, x)| {
        Complex::new(img[[y.min(h - 1), x.min(w - 1)]], 0.0f32)
    });
    fft2(&mut spectrum, false);
    let norm = 1.0 / (pw * ph) as f32;
    let mut numerator = Array2::<f32>::zeros((h, w));
    let mut amplitude = Array2::<f32>::zeros((h, w));
    for o in 0..p.orientations {
        let mut energy = Array2::<f32>::zeros((h, w));
        let mut mean_a0 = 0.0f32;
        for s in 0..p.scales {
            let mut r = Array2::from_shape_fn((ph, pw), |(v, u)| {
                spectrum[[v, u]] * log_gabor(&p, u, v, s, o)
            });
            fft2(&mut r, true);
            let mut sum_a = 0.0f64;
            ndarray::Zip::indexed(&mut energy)
                .and(&mut amplitude)
                .for_each(|(y, x), e, a| {
                    let z = r[[y, x]] * norm;
                    let amp = (z.re * z.re + z.im * z.im).sqrt();
                    *a += amp;
                    *e += z.re - z.im.abs();
                    sum_a += amp as f64;
                });
            if s == 0 {
                mean_a0 = (sum_a / (w * h) as f64) as f32;
            }
        }
        let t = noise_threshold(&p, mean_a0);
        numerator.zip_mut_with(&energy, |n, e| *n += (e - t).max(0.0));
    }
    let mut out = numerator;
    out.zip_mut_with(&amplitude, |n, a| *n /= a + EPSILON);
    out.par_mapv_inplace(|v| v.clamp(0.0, 1.0));
    Ok(out)
}

/// Queues the whole bank on a GPU chain; the phase symmetry map becomes the current image.
#[cfg(feature = "gpu")]
pub fn encode(chain: &mut crate::gpu::GpuChain<'_>, params: &Params) -> crate::Result<()> {
    let p = params.resolved(chain.width(), chain.height());
    let (pw, ph) = (p.pad_width as usize, p.pad_height as usize);
    if pw > MAX_FFT_SIDE || ph > MAX_FFT_SIDE {
        return Err(crate::gpu::GpuError::TooLarge {
            width: chain.width(),
            height: chain.height(),
            reason: format!(
                "phase symmetry pads to {pw}x{ph}; the GPU FFT handles sides up to {MAX_FFT_SIDE}"
            ),
        }
        .into());
    }
    let tiles = |w: usize, h: usize| ((w as u32).div_ceil(16), (h as u32).div_ceil(16));
    let pad = (pw, ph);
    // The filter bank depends on the padded size and the filters only: evaluated once, kept
    // with the FFT buffers, and refilled when either changes.
    let planes = (p.scales * p.orientations) as usize;
    if chain.fft_bank(pad, planes, bank_key(&p))? {
        for o in 0..p.orientations {
            for s in 0..p.scales {
                let mut q = p;
                q.orientation = o;
                q.scale = s;
                chain.dispatch_fft(NAME, SHADER, "ps_bank", &q, pad, tiles(pw, ph), false)?;
            }
        }
    }
    chain.dispatch_fft(NAME, SHADER, "ps_load", &p, pad, tiles(pw, ph), false)?;
    chain.dispatch_fft(
        NAME,
        SHADER,
        "ps_fft_rows_spectrum",
        &p,
        pad,
        (1, ph as u32),
        false,
    )?;
    chain.dispatch_fft(
        NAME,
        SHADER,
        "ps_fft_cols_spectrum",
        &p,
        pad,
        (pw as u32, 1),
        false,
    )?;
    for o in 0..p.orientations {
        for s in 0..p.scales {
            let mut q = p;
            q.orientation = o;
            q.scale = s;
            chain.dispatch_fft(NAME, SHADER, "ps_filter", &q, pad, tiles(pw, ph), false)?;
            chain.dispatch_fft(
                NAME,
                SHADER,
                "ps_fft_rows_work",
                &q,
                pad,
                (1, ph as u32),
                false,
            )?;
            chain.dispatch_fft(
                NAME,
                SHADER,
                "ps_fft_cols_work",
                &q,
                pad,
                (pw as u32, 1),
                false,
            )?;
            chain.dispatch_fft(
                NAME,
                SHADER,
                "ps_accumulate",
                &q,
                pad,
                tiles(chain.width(), chain.height()),
                false,
            )?;
        }
        let mut q = p;
        q.orientation = o;
        chain.dispatch_fft(NAME, SHADER, "ps_threshold", &q, pad, (1, 1), false)?;
        chain.dispatch_fft(
            NAME,
            SHADER,
            "ps_orient",
            &q,
            pad,
            tiles(chain.width(), chain.height()),
            false,
        )?;
    }
    chain.dispatch_fft(
        NAME,
        SHADER,
        "ps_finish",
        &p,
        pad,
        tiles(chain.width(), chain.height()),
        true,
    )?;
    Ok(())
}
