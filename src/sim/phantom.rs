//! Synthetic musculoskeletal ultrasound phantoms with ground truth.
//!
//! The image is formed the way a scanner forms it, not by adding noise to a picture:
//!
//! 1. An anatomy in tissue coordinates (mm): skin, subcutaneous fat with septa, muscle, a
//!    fibrillar tendon, bone with hypoechoic cartilage, two bone ends with a joint recess and an
//!    anechoic effusion between them, a vessel. Each structure has a backscatter power
//!    (echogenicity) and an attenuation coefficient.
//! 2. Complex Gaussian scatterers on the grid, amplitude √(echogenicity); the tendon's are
//!    modulated along its fibres (anisotropic, fibrillar texture); the bone surface is a
//!    specular reflector (coherent phase).
//! 3. Two-way depth attenuation integrated down each column (bone stops the beam: acoustic
//!    shadow; fluid barely attenuates: posterior enhancement), then time-gain compensation for
//!    the nominal tissue attenuation.
//! 4. Convolution with the point-spread function by FFT (rustfft): an axial Gaussian pulse
//!    whose length follows from the transmit frequency and bandwidth, and a lateral Gaussian beam
//!    of width λ·F#. The simulation runs on the IQ (baseband) signal, so the envelope is |IQ|.
//! 5. Thermal noise, envelope detection, log compression to 8 bits over a fixed dynamic range.
//!
//! A curved-array phantom is simulated in beam space (angle × range) and scan-converted to a
//! fan. A cine moves the probe sideways over the same tissue (the speckle moves with it).

use std::f64::consts::PI;

use ndarray::{Array2, Array3};
use rustfft::num_complex::Complex;

use crate::fft::fft2;
use serde::Serialize;

use crate::frame::Rect;
use crate::label::Label;
use crate::plan::TargetKind;

/// Probe geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Geometry {
    /// Linear array: rectangular image.
    Linear,
    /// Curved array: fan-shaped image.
    Curved,
}

/// Settings of one phantom case.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PhantomParams {
    /// Output columns.
    pub width: usize,
    /// Output rows.
    pub height: usize,
    /// Millimetres per pixel (both axes).
    pub mm_per_px: f64,
    /// Frames (1 = still image; more = the probe slides sideways).
    pub frames: usize,
    /// Probe geometry.
    pub geometry: Geometry,
    /// Seed of every random choice.
    pub seed: u64,
    /// Transmit frequency in MHz.
    pub frequency_mhz: f64,
    /// Lateral probe motion per frame, in pixels.
    pub motion_px_per_frame: usize,
}

impl Default for PhantomParams {
    fn default() -> Self {
        PhantomParams {
            width: 480,
            height: 360,
            mm_per_px: 0.08,
            frames: 1,
            geometry: Geometry::Linear,
            seed: 1,
            frequency_mhz: 7.5,
            motion_px_per_frame: 1,
        }
    }
}

/// The log-compression range in dB: grey 0 is this far below the reference power.
pub const DYNAMIC_RANGE_DB: f64 = 60.0;
/// Mean of 10·log10 of an exponentially distributed power relative to the log of its mean
/// (−γ·10/ln 10): fully developed speckle sits this far below its mean power after log
/// compression. The clean map includes it so that it is what an ideal despeckler returns.
const LOG_SPECKLE_BIAS_DB: f64 = -2.5068;
/// Speed of sound in soft tissue, mm/µs.
const SOUND_SPEED_MM_PER_US: f64 = 1.54;
/// Fractional −6 dB bandwidth of the transmit pulse.
const FRACTIONAL_BANDWIDTH: f64 = 0.5;
/// Receive F-number of the lateral beam.
const F_NUMBER: f64 = 2.0;
/// Soft-tissue attenuation, dB/cm/MHz (one way).
const TISSUE_ATTEN_DB_CM_MHZ: f64 = 0.5;
/// Reference power: grey 255 sits just above the specular bone echo.
const REFERENCE_POWER: f64 = 5000.0;
/// Thermal noise power, relative to the reference power: −58 dB, a dim shadow floor.
const NOISE_POWER: f64 = REFERENCE_POWER * 1.6e-6;

/// Backscatter power of each tissue, relative to muscle.
mod echo {
    pub const SKIN: f64 = 5.0;
    pub const FAT: f64 = 0.3;
    pub const SEPTUM: f64 = 3.0;
    pub const MUSCLE: f64 = 1.0;
    pub const TENDON: f64 = 12.0;
    pub const CARTILAGE: f64 = 0.04;
    pub const FLUID: f64 = 0.0005;
    pub const BONE: f64 = 2500.0;
    pub const VESSEL_WALL: f64 = 4.0;
}

/// A structure a needle must avoid, in mm of the first frame.
#[derive(Debug, Clone, Serialize)]
pub struct Forbidden {
    /// `"bone"` or `"vessel"`.
    pub kind: &'static str,
    /// Polyline (bone) or centre (vessel), px.
    pub points_px: Vec<[f64; 2]>,
    /// The same in mm.
    pub points_mm: Vec<[f64; 2]>,
    /// Radius in mm (vessels).
    pub radius_mm: Option<f64>,
}

/// Per-frame truth.
#[derive(Debug, Clone, Serialize)]
pub struct FrameTruth {
    /// Frame number.
    pub index: usize,
    /// Bone surface polylines, px (column, row).
    pub bone_polylines_px: Vec<Vec<[f64; 2]>>,
    /// The same in mm (lateral from the reference pixel, depth from the transducer face).
    pub bone_polylines_mm: Vec<Vec<[f64; 2]>>,
    /// Ideal injection target, px.
    pub target_px: Option<[f64; 2]>,
    /// Ideal injection target, mm.
    pub target_mm: Option<[f64; 2]>,
}

/// What the phantom contains, written as `NAME.truth.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Truth {
    /// Case name.
    pub name: String,
    /// Seed.
    pub seed: u64,
    /// Geometry.
    pub geometry: Geometry,
    /// Columns and rows.
    pub size_px: [usize; 2],
    /// Millimetres per pixel (x, y).
    pub spacing_mm: [f64; 2],
    /// Reference pixel (column, row): lateral 0 and depth 0 (transducer face).
    pub reference_px: [f64; 2],
    /// The imaging region, px (end exclusive).
    pub region: Rect,
    /// `"joint"`, `"bone"` or `"soft_tissue"`.
    pub scene: &'static str,
    /// `"joint_space"`, `"effusion"` or `"peritendinous"`.
    pub target_kind: TargetKind,
    /// Transmit frequency, MHz.
    pub frequency_mhz: f64,
    /// Structures the needle must avoid (first frame).
    pub forbidden: Vec<Forbidden>,
    /// Per-frame truth.
    pub frames: Vec<FrameTruth>,
}

/// A generated case.
#[derive(Debug, Clone)]
pub struct Phantom {
    /// B-mode frames, 8-bit, `[row, column]`.
    pub frames: Vec<Array2<u8>>,
    /// Noise-free echogenicity maps (log-compressed like the frames).
    pub clean: Vec<Array2<u8>>,
    /// Label maps.
    pub labels: Vec<Array2<u8>>,
    /// Everything else that is known.
    pub truth: Truth,
}

/// SplitMix64: a small, well-mixed generator whose output is fixed by its seed forever
/// (phantoms must not change when a dependency does).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [a, b).
    pub fn range(&mut self, a: f64, b: f64) -> f64 {
        a + (b - a) * self.unit()
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.unit().max(1e-300);
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (2.0 * PI * u2).cos()
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Scene {
    Joint,
    Bone,
    SoftTissue,
}

/// The anatomy, in tissue millimetres (u lateral, d depth).
#[derive(Debug, Clone)]
struct Anatomy {
    scene: Scene,
    skin_mm: f64,
    fat_mm: f64,
    septa: Vec<(f64, f64, f64)>, // depth at u=0, slope, thickness
    tendon_top: f64,
    tendon_thick: f64,
    tendon_slope: f64,
    tendon_u: (f64, f64),
    fibre_period: f64,
    fibre_phase: f64,
    bone_base: [f64; 2],
    bone_wave: (f64, f64, f64),
    gap: (f64, f64),
    end_radius: f64,
    cartilage_mm: f64,
    effusion_height: f64,
    effusion_u: (f64, f64),
    recess_depth: f64,
    vessel: Option<(f64, f64, f64)>,
    width_mm: f64,
}

impl Anatomy {
    fn random(rng: &mut Rng, width_mm: f64, depth_mm: f64) -> Anatomy {
        let r = rng.unit();
        let scene = if r < 0.55 {
            Scene::Joint
        } else if r < 0.8 {
            Scene::Bone
        } else {
            Scene::SoftTissue
        };
        let skin_mm = rng.range(0.6, 1.1);
        let fat_mm = skin_mm + rng.range(1.5, 3.5);
        let septa = (0..rng.range(1.0, 4.0) as usize)
            .map(|_| {
                (
                    rng.range(skin_mm + 0.4, fat_mm - 0.2),
                    rng.range(-0.08, 0.08),
                    rng.range(0.1, 0.2),
                )
            })
            .collect();
        let tendon_top = fat_mm + rng.range(0.3, 1.5);
        let tendon_thick = rng.range(2.5, 4.0);
        let bone_depth = (tendon_top + tendon_thick + rng.range(5.0, 8.0)).min(depth_mm * 0.6);
        let gap_w = rng.range(3.0, 6.0);
        let gap_c = width_mm * rng.range(0.4, 0.6);
        let vessel_r = rng.range(0.9, 1.8);
        let has_vessel = rng.unit() < 0.6;
        let mut a = Anatomy {
            scene,
            skin_mm,
            fat_mm,
            septa,
            tendon_top,
            tendon_thick,
            tendon_slope: rng.range(-0.04, 0.04),
            tendon_u: (
                width_mm * rng.range(-0.1, 0.1),
                width_mm * rng.range(0.9, 1.1),
            ),
            fibre_period: rng.range(0.3, 0.5),
            fibre_phase: rng.range(0.0, 2.0 * PI),
            bone_base: [
                bone_depth + rng.range(-1.0, 1.0),
                bone_depth + rng.range(-1.0, 1.0),
            ],
            bone_wave: (
                rng.range(0.2, 0.7),
                rng.range(25.0, 50.0),
                rng.range(0.0, 2.0 * PI),
            ),
            gap: (gap_c - gap_w / 2.0, gap_c + gap_w / 2.0),
            end_radius: rng.range(2.5, 4.0),
            cartilage_mm: rng.range(0.8, 1.4),
            effusion_height: rng.range(1.2, 2.5),
            effusion_u: (0.0, 0.0),
            recess_depth: rng.range(1.5, 2.5),
            vessel: None,
            width_mm,
        };
        match scene {
            Scene::Joint => {
                a.effusion_u = (a.gap.0 - rng.range(1.5, 3.0), a.gap.1 + rng.range(1.5, 3.0))
            }
            Scene::Bone => {
                // A bursa-like anechoic collection over the bone, half of the time.
                if rng.unit() < 0.5 {
                    let c = width_mm * rng.range(0.3, 0.7);
                    let w = rng.range(4.0, 8.0);
                    a.effusion_u = (c - w / 2.0, c + w / 2.0);
                }
            }
            Scene::SoftTissue => {}
        }
        if has_vessel {
            // Deep to the tendon, shallower than bone, and clear of the joint by 3 mm.
            let top = a.tendon_top + a.tendon_thick + vessel_r + 0.8;
            let bottom = if scene == Scene::SoftTissue {
                depth_mm - vessel_r - 3.0
            } else {
                a.bone_base[0].min(a.bone_base[1])
                    - a.bone_wave.0
                    - a.cartilage_mm
                    - a.effusion_height
                    - vessel_r
                    - 1.0
            };
            if bottom > top {
                let d = rng.range(top, bottom);
                let mut u = width_mm * rng.range(0.12, 0.88);
                let busy = (
                    a.effusion_u.0.min(a.gap.0) - vessel_r - 3.0,
                    a.effusion_u.1.max(a.gap.1) + vessel_r + 3.0,
                );
                if scene != Scene::SoftTissue && u > busy.0 && u < busy.1 {
                    u = if busy.0 > width_mm - busy.1 {
                        busy.0 * 0.5
                    } else {
                        (busy.1 + width_mm) * 0.5
                    };
                }
                a.vessel = Some((u, d, vessel_r));
            }
        }
        a
    }

    fn has_bone_at(&self, u: f64) -> bool {
        match self.scene {
            Scene::Joint => u < self.gap.0 || u > self.gap.1,
            Scene::Bone => true,
            Scene::SoftTissue => false,
        }
    }

    /// Depth of the bone surface at lateral position u (where there is bone).
    fn bone_depth(&self, u: f64) -> f64 {
        let (amp, period, phase) = self.bone_wave;
        let wave = amp * (2.0 * PI * u / period + phase).sin();
        match self.scene {
            Scene::Joint => {
                if u < self.gap.0 {
                    let t = (u - (self.gap.0 - self.end_radius)).max(0.0);
                    self.bone_base[0] + wave + t * t / self.end_radius * 0.8
                } else {
                    let t = ((self.gap.1 + self.end_radius) - u).max(0.0);
                    self.bone_base[1] + wave + t * t / self.end_radius * 0.8
                }
            }
            _ => self.bone_base[0] + wave,
        }
    }

    fn effusion_top(&self, u: f64) -> Option<f64> {
        let (a, b) = self.effusion_u;
        if b <= a || u <= a || u >= b {
            return None;
        }
        let t = (u - a) / (b - a);
        let base = self.effusion_base(u);
        Some(base - self.effusion_height * (PI * t).sin().sqrt())
    }

    /// The floor of the effusion: cartilage top over bone, or the recess top in the gap.
    fn effusion_base(&self, u: f64) -> f64 {
        let left = self.bone_depth(self.gap.0.min(u).max(0.0));
        let right = self.bone_depth(self.gap.1.max(u));
        if self.scene == Scene::Joint && u >= self.gap.0 && u <= self.gap.1 {
            left.min(right) - self.cartilage_mm
        } else {
            self.bone_depth(u) - self.cartilage_mm
        }
    }

    fn tendon_range(&self, u: f64) -> Option<(f64, f64)> {
        if u < self.tendon_u.0 || u > self.tendon_u.1 {
            return None;
        }
        let mid = (self.width_mm / 2.0 - u) * self.tendon_slope;
        let top = self.tendon_top + mid;
        Some((top, top + self.tendon_thick))
    }

    /// Echogenicity, one-way attenuation (dB/cm/MHz), label, and specular flag at (u, d).
    fn tissue(&self, u: f64, d: f64) -> (f64, f64, u8, bool) {
        const BONE_BAND_ABOVE: f64 = 0.2;
        const BONE_BAND_BELOW: f64 = 0.3;
        if let Some((vu, vd, vr)) = self.vessel {
            let r = ((u - vu).powi(2) + (d - vd).powi(2)).sqrt();
            if r < vr {
                return (echo::FLUID, 0.02, Label::Vessel.code(), false);
            }
            if r < vr + 0.15 {
                return (
                    echo::VESSEL_WALL,
                    TISSUE_ATTEN_DB_CM_MHZ,
                    Label::Vessel.code(),
                    false,
                );
            }
        }
        if self.scene != Scene::SoftTissue && self.has_bone_at(u) {
            let bd = self.bone_depth(u);
            if d >= bd - BONE_BAND_ABOVE && d < bd + BONE_BAND_BELOW {
                // The interface reflects specularly from the surface (depth bd) down 0.15 mm;
                // above it is cartilage, below it cortical bone that the beam barely enters.
                if d < bd {
                    return (echo::CARTILAGE, 0.3, Label::Bone.code(), false);
                }
                let specular = d < bd + 0.15;
                return (
                    if specular {
                        echo::BONE
                    } else {
                        echo::BONE * 0.05
                    },
                    40.0,
                    Label::Bone.code(),
                    specular,
                );
            }
            if d >= bd + BONE_BAND_BELOW {
                return (echo::MUSCLE, 40.0, Label::Shadow.code(), false);
            }
        }
        if self.scene == Scene::Joint && u >= self.gap.0 && u <= self.gap.1 {
            let floor = self.effusion_base(u);
            if d >= floor && d < floor + self.cartilage_mm + self.recess_depth {
                return (echo::FLUID * 4.0, 0.05, Label::Joint.code(), false);
            }
        }
        if let Some(top) = self.effusion_top(u) {
            if d >= top && d < self.effusion_base(u) {
                return (echo::FLUID, 0.02, Label::Joint.code(), false);
            }
        }
        if self.scene != Scene::SoftTissue && self.has_bone_at(u) {
            let bd = self.bone_depth(u);
            if d >= bd - self.cartilage_mm {
                return (echo::CARTILAGE, 0.3, Label::Background.code(), false);
            }
        }
        if let Some((t0, t1)) = self.tendon_range(u) {
            if d >= t0 && d < t1 {
                // Fibrils run along the tendon: a quasi-periodic modulation across them.
                let along = d - t0 + self.tendon_slope * u;
                let m = 0.25
                    + 1.5
                        * (0.5
                            + 0.5
                                * (2.0 * PI * along / self.fibre_period + self.fibre_phase).cos())
                        .powi(2);
                return (echo::TENDON * m, 0.9, Label::Tendon.code(), false);
            }
        }
        if d < self.skin_mm {
            return (
                echo::SKIN,
                TISSUE_ATTEN_DB_CM_MHZ,
                Label::Background.code(),
                false,
            );
        }
        if d < self.fat_mm {
            for (d0, slope, thick) in &self.septa {
                let sd = d0 + slope * u;
                if (d - sd).abs() < thick / 2.0 {
                    return (
                        echo::SEPTUM,
                        TISSUE_ATTEN_DB_CM_MHZ,
                        Label::Background.code(),
                        false,
                    );
                }
            }
            return (echo::FAT, 0.6, Label::Background.code(), false);
        }
        // Muscle with faint perimysium striations.
        let stria = 1.0 + 0.6 * ((2.0 * PI * (d + 0.15 * u) / 1.6).sin().max(0.0)).powi(6);
        (
            echo::MUSCLE * stria,
            TISSUE_ATTEN_DB_CM_MHZ,
            Label::Background.code(),
            false,
        )
    }
}

/// Circular convolution of `field` with a separable Gaussian kernel (σ in pixels along rows
/// and columns), by FFT. `field` is padded by the caller.
fn convolve_gaussian(field: &mut Array2<Complex<f64>>, sigma_y: f64, sigma_x: f64, squared: bool) {
    let (h, w) = field.dim();
    let mut kernel = Array2::<Complex<f64>>::zeros((h, w));
    let ry = (4.0 * sigma_y).ceil() as isize;
    let rx = (4.0 * sigma_x).ceil() as isize;
    let mut total = 0.0;
    for dy in -ry..=ry {
        for dx in -rx..=rx {
            let mut g = (-(dy * dy) as f64 / (2.0 * sigma_y * sigma_y)
                - (dx * dx) as f64 / (2.0 * sigma_x * sigma_x))
                .exp();
            if squared {
                g *= g;
            }
            let y = dy.rem_euclid(h as isize) as usize;
            let x = dx.rem_euclid(w as isize) as usize;
            kernel[[y, x]].re += g;
            total += g * g;
        }
    }
    // Amplitude PSF normalised to unit energy (speckle power = scatterer power); the power
    // PSF (|h|²) to unit sum, so that mean power is preserved.
    let norm = if squared {
        kernel.iter().map(|c| c.re).sum::<f64>()
    } else {
        total.sqrt()
    };
    kernel.mapv_inplace(|c| c / norm);
    fft2(field, false);
    fft2(&mut kernel, false);
    let n = (h * w) as f64;
    ndarray::Zip::from(&mut *field)
        .and(&kernel)
        .par_for_each(|f, k| *f = *f * *k / n);
    fft2(field, true);
}

fn power_to_grey(p: f64) -> f64 {
    let db = 10.0 * (p.max(1e-30) / REFERENCE_POWER).log10();
    (255.0 * (db + DYNAMIC_RANGE_DB) / DYNAMIC_RANGE_DB).clamp(0.0, 255.0)
}

/// Generates one case.
pub fn generate(name: &str, params: &PhantomParams) -> super::Result<Phantom> {
    let p = params;
    if p.width < 32 || p.height < 32 || p.width > 4096 || p.height > 4096 {
        return Err(crate::sim::SimError::InvalidParameter {
            name: "size",
            reason: format!("{}x{} (32..4096 each)", p.width, p.height),
        });
    }
    if p.frames == 0 || p.frames > 1000 {
        return Err(crate::sim::SimError::InvalidParameter {
            name: "frames",
            reason: format!("{} (1..1000)", p.frames),
        });
    }
    if !(p.mm_per_px > 0.01 && p.mm_per_px < 1.0) {
        return Err(crate::sim::SimError::InvalidParameter {
            name: "mm_per_px",
            reason: format!("{} (0.01..1)", p.mm_per_px),
        });
    }
    if !(p.frequency_mhz >= 2.0 && p.frequency_mhz <= 20.0) {
        return Err(crate::sim::SimError::InvalidParameter {
            name: "frequency_mhz",
            reason: format!("{} (2..20)", p.frequency_mhz),
        });
    }
    let mut rng = Rng::new(p.seed);
    let s = p.mm_per_px;
    // Beam space: for a curved array, columns are angles and rows range; same pixel count.
    let motion = p.motion_px_per_frame * (p.frames - 1);
    let conv = ScanConverter::new(p.width, p.height, s);
    let beam_cols = match p.geometry {
        Geometry::Linear => p.width,
        Geometry::Curved => conv.beam_cols,
    };
    let (bw, bh) = (beam_cols + motion, p.height);
    let width_mm = bw as f64 * s;
    let anatomy = Anatomy::random(&mut rng, beam_cols as f64 * s, bh as f64 * s);
    // Shift the anatomy so that frame 0 sees it centred on its first `width` columns.
    let u_of = |x: usize| x as f64 * s;
    let d_of = |y: usize| y as f64 * s;

    // Tissue properties on the beam-space canvas.
    let mut echo_map = Array2::<f64>::zeros((bh, bw));
    let mut atten = Array2::<f64>::zeros((bh, bw));
    let mut labels = Array2::<u8>::zeros((bh, bw));
    let mut specular = Array2::<bool>::from_elem((bh, bw), false);
    for y in 0..bh {
        for x in 0..bw {
            let (e, a, l, sp) = anatomy.tissue(u_of(x), d_of(y));
            echo_map[[y, x]] = e;
            atten[[y, x]] = a;
            labels[[y, x]] = l;
            specular[[y, x]] = sp;
        }
    }
    let _ = width_mm;
    // Two-way attenuation down each column, with TGC for nominal tissue.
    let f = p.frequency_mhz;
    let mut gain = Array2::<f64>::zeros((bh, bw));
    for x in 0..bw {
        let mut db = 0.0;
        for y in 0..bh {
            // dB lost over one pixel, two ways, minus the TGC's nominal compensation.
            let step_cm = s / 10.0;
            db += 2.0 * (atten[[y, x]] - TISSUE_ATTEN_DB_CM_MHZ) * f * step_cm;
            gain[[y, x]] = 10f64.powf(-db / 10.0).min(1e3);
        }
    }
    // Scatterers: complex Gaussian, amplitude √(echo × gain); specular bone: coherent phase.
    let pad = 16;
    let (ph, pw) = (bh + 2 * pad, bw + 2 * pad);
    let mut iq = Array2::<Complex<f64>>::zeros((ph, pw));
    let mut mean_power = Array2::<Complex<f64>>::zeros((ph, pw));
    for y in 0..bh {
        for x in 0..bw {
            let power = echo_map[[y, x]] * gain[[y, x]];
            let amp = power.sqrt();
            let z = if specular[[y, x]] {
                // A mirror-like interface: mostly coherent, with slight roughness.
                Complex::new(amp * (0.7 + 0.3 * rng.normal()), amp * 0.3 * rng.normal())
            } else {
                Complex::new(rng.normal(), rng.normal()) * (amp / 2f64.sqrt())
            };
            iq[[y + pad, x + pad]] = z;
            mean_power[[y + pad, x + pad]] = Complex::new(power, 0.0);
        }
    }
    // The PSF: axial Gaussian pulse from the frequency and bandwidth, lateral beam λ·F#.
    let sigma_t_us = 2.0 * (2.0 * 2f64.ln()).sqrt() / (2.0 * PI * FRACTIONAL_BANDWIDTH * f);
    let sigma_z_mm = SOUND_SPEED_MM_PER_US * sigma_t_us / 2.0;
    let wavelength_mm = SOUND_SPEED_MM_PER_US / f;
    let sigma_x_mm = wavelength_mm * F_NUMBER / (2.0 * (2.0 * 2f64.ln()).sqrt());
    let (sy, sx) = ((sigma_z_mm / s).max(0.5), (sigma_x_mm / s).max(0.5));
    convolve_gaussian(&mut iq, sy, sx, false);
    convolve_gaussian(&mut mean_power, sy, sx, true);

    // Frames: windows of the canvas; curved arrays scan-converted.
    let mut frames = Vec::with_capacity(p.frames);
    let mut cleans = Vec::with_capacity(p.frames);
    let mut label_frames = Vec::with_capacity(p.frames);
    let noise_amp = (NOISE_POWER / 2.0).sqrt();
    let mut beam_frames = Vec::new();
    for k in 0..p.frames {
        let off = k * p.motion_px_per_frame;
        let mut img = Array2::<f64>::zeros((bh, beam_cols));
        let mut clean = Array2::<f64>::zeros((bh, beam_cols));
        let mut lab = Array2::<u8>::zeros((bh, beam_cols));
        for y in 0..bh {
            for x in 0..beam_cols {
                let z = iq[[y + pad, x + off + pad]]
                    + Complex::new(rng.normal(), rng.normal()) * noise_amp;
                img[[y, x]] = power_to_grey(z.norm_sqr());
                let mp = mean_power[[y + pad, x + off + pad]].re.max(0.0) + NOISE_POWER;
                clean[[y, x]] = power_to_grey(mp * 10f64.powf(LOG_SPECKLE_BIAS_DB / 10.0));
                lab[[y, x]] = labels[[y, x + off]];
            }
        }
        beam_frames.push(off);
        match p.geometry {
            Geometry::Linear => {
                frames.push(img.mapv(|v| v.round() as u8));
                cleans.push(clean.mapv(|v| v.round() as u8));
                label_frames.push(lab);
            }
            Geometry::Curved => {
                frames.push(conv.convert(&img).mapv(|v| v.round() as u8));
                cleans.push(conv.convert(&clean).mapv(|v| v.round() as u8));
                label_frames.push(conv.convert_nearest(&lab));
            }
        }
    }

    // Truth: bone polylines, target, forbidden structures, per frame.
    let reference_px = match p.geometry {
        Geometry::Linear => [p.width as f64 / 2.0, 0.0],
        Geometry::Curved => [p.width as f64 / 2.0, 0.0],
    };
    let to_px = |u: f64, d: f64, off: usize| -> [f64; 2] {
        let bx = u / s - off as f64;
        let by = d / s;
        match p.geometry {
            Geometry::Linear => [bx, by],
            Geometry::Curved => conv.beam_to_image(bx, by),
        }
    };
    let to_mm = |px: [f64; 2]| [(px[0] - reference_px[0]) * s, (px[1] - reference_px[1]) * s];
    let (target_kind, target_ud) = match anatomy.scene {
        Scene::Joint => {
            let u = (anatomy.gap.0 + anatomy.gap.1) / 2.0;
            let floor = anatomy.effusion_base(u);
            (
                TargetKind::JointSpace,
                (
                    u,
                    floor + (anatomy.cartilage_mm + anatomy.recess_depth) / 2.0,
                ),
            )
        }
        _ if anatomy.effusion_u.1 > anatomy.effusion_u.0 => {
            let u = (anatomy.effusion_u.0 + anatomy.effusion_u.1) / 2.0;
            // Deepest safe point: 1 mm above the effusion floor.
            (TargetKind::Effusion, (u, anatomy.effusion_base(u) - 1.0))
        }
        _ => {
            let u = anatomy.width_mm / 2.0;
            let top = anatomy
                .tendon_range(u)
                .map(|r| r.0)
                .unwrap_or(anatomy.tendon_top);
            (TargetKind::Peritendinous, (u, top - 0.5))
        }
    };
    let mut frame_truths = Vec::new();
    for (k, off) in beam_frames.iter().enumerate() {
        let mut polylines = Vec::new();
        if anatomy.scene != Scene::SoftTissue {
            let mut current: Vec<[f64; 2]> = Vec::new();
            for x in 0..beam_cols {
                let u = u_of(x + off);
                if anatomy.has_bone_at(u) {
                    current.push(to_px(u, anatomy.bone_depth(u), *off));
                } else if !current.is_empty() {
                    polylines.push(std::mem::take(&mut current));
                }
            }
            if !current.is_empty() {
                polylines.push(current);
            }
        }
        let mm: Vec<Vec<[f64; 2]>> = polylines
            .iter()
            .map(|l| l.iter().map(|q| to_mm(*q)).collect())
            .collect();
        let tpx = to_px(target_ud.0, target_ud.1, *off);
        let inside =
            tpx[0] >= 0.0 && tpx[0] < p.width as f64 && tpx[1] >= 0.0 && tpx[1] < p.height as f64;
        frame_truths.push(FrameTruth {
            index: k,
            bone_polylines_px: polylines,
            bone_polylines_mm: mm,
            target_px: inside.then_some(tpx),
            target_mm: inside.then(|| to_mm(tpx)),
        });
    }
    let mut forbidden = Vec::new();
    if let Some(first) = frame_truths.first() {
        for l in &first.bone_polylines_px {
            forbidden.push(Forbidden {
                kind: "bone",
                points_px: l.clone(),
                points_mm: l.iter().map(|q| to_mm(*q)).collect(),
                radius_mm: None,
            });
        }
    }
    if let Some((vu, vd, vr)) = anatomy.vessel {
        let c = to_px(vu, vd, 0);
        forbidden.push(Forbidden {
            kind: "vessel",
            points_px: vec![c],
            points_mm: vec![to_mm(c)],
            radius_mm: Some(vr),
        });
    }
    let region = match p.geometry {
        Geometry::Linear => Rect::full(p.width, p.height),
        Geometry::Curved => conv.bounds(),
    };
    let truth = Truth {
        name: name.to_string(),
        seed: p.seed,
        geometry: p.geometry,
        size_px: [p.width, p.height],
        spacing_mm: [s, s],
        reference_px,
        region,
        scene: match anatomy.scene {
            Scene::Joint => "joint",
            Scene::Bone => "bone",
            Scene::SoftTissue => "soft_tissue",
        },
        target_kind,
        frequency_mhz: f,
        forbidden,
        frames: frame_truths,
    };
    Ok(Phantom {
        frames,
        clean: cleans,
        labels: label_frames,
        truth,
    })
}

/// Maps a beam-space image (columns = angle, rows = range) onto a fan.
///
/// The apex sits above the top row at the centre column; the transducer face is an arc of
/// radius `R` through the top-centre pixel. Beam column x spans arc length x·s on that face.
struct ScanConverter {
    width: usize,
    height: usize,
    radius_px: f64,
    /// Beam-space columns: the fan's arc length on the face, in pixels, chosen so that the
    /// whole fan fits the frame.
    beam_cols: usize,
}

/// Radius of the curved array's face in mm (a typical MSK/abdominal curvilinear probe).
const CURVED_RADIUS_MM: f64 = 40.0;

impl ScanConverter {
    fn new(width: usize, height: usize, s: f64) -> Self {
        let radius_px = CURVED_RADIUS_MM / s;
        // Widest half-angle whose deepest point stays inside the frame, with a 2 % margin.
        let half = ((width as f64 / 2.0) / (radius_px + height as f64))
            .min(1.0)
            .asin()
            * 0.98;
        let beam_cols = ((2.0 * half * radius_px) as usize).clamp(8, width);
        ScanConverter {
            width,
            height,
            radius_px,
            beam_cols,
        }
    }
    fn apex(&self) -> (f64, f64) {
        (self.width as f64 / 2.0, -self.radius_px)
    }
    /// Beam coordinates (column, range row) for image pixel (x, y), if inside the fan.
    fn image_to_beam(&self, x: f64, y: f64) -> Option<(f64, f64)> {
        let (ax, ay) = self.apex();
        let (dx, dy) = (x - ax, y - ay);
        let r = (dx * dx + dy * dy).sqrt();
        let theta = dx.atan2(dy);
        let bx = theta * self.radius_px + self.beam_cols as f64 / 2.0;
        let by = r - self.radius_px;
        (bx >= 0.0
            && bx <= (self.beam_cols - 1) as f64
            && by >= 0.0
            && by <= (self.height - 1) as f64)
            .then_some((bx, by))
    }
    fn beam_to_image(&self, bx: f64, by: f64) -> [f64; 2] {
        let (ax, ay) = self.apex();
        let theta = (bx - self.beam_cols as f64 / 2.0) / self.radius_px;
        let r = by + self.radius_px;
        [ax + r * theta.sin(), ay + r * theta.cos()]
    }
    fn convert(&self, beam: &Array2<f64>) -> Array2<f64> {
        Array2::from_shape_fn((self.height, self.width), |(y, x)| {
            match self.image_to_beam(x as f64, y as f64) {
                Some((bx, by)) => {
                    let (x0, y0) = (bx.floor() as usize, by.floor() as usize);
                    let (x1, y1) = (
                        (x0 + 1).min(self.beam_cols - 1),
                        (y0 + 1).min(self.height - 1),
                    );
                    let (fx, fy) = (bx - x0 as f64, by - y0 as f64);
                    let top = beam[[y0, x0]] * (1.0 - fx) + beam[[y0, x1]] * fx;
                    let bot = beam[[y1, x0]] * (1.0 - fx) + beam[[y1, x1]] * fx;
                    top * (1.0 - fy) + bot * fy
                }
                None => 0.0,
            }
        })
    }
    fn convert_nearest(&self, beam: &Array2<u8>) -> Array2<u8> {
        Array2::from_shape_fn((self.height, self.width), |(y, x)| {
            match self.image_to_beam(x as f64, y as f64) {
                Some((bx, by)) => beam[[by.round() as usize, bx.round() as usize]],
                None => 0,
            }
        })
    }
    fn bounds(&self) -> Rect {
        let mut r = Rect {
            x0: self.width,
            y0: self.height,
            x1: 0,
            y1: 0,
        };
        for y in 0..self.height {
            for x in 0..self.width {
                if self.image_to_beam(x as f64, y as f64).is_some() {
                    r.x0 = r.x0.min(x);
                    r.y0 = r.y0.min(y);
                    r.x1 = r.x1.max(x + 1);
                    r.y1 = r.y1.max(y + 1);
                }
            }
        }
        r
    }
}

/// Expands 8-bit grey frames to RGB for colour outputs.
pub fn gray_to_rgb(a: &Array2<u8>) -> Array3<u8> {
    let (h, w) = a.dim();
    Array3::from_shape_fn((h, w, 3), |(y, x, _)| a[[y, x]])
}

/// Generates case `name` and writes `NAME.dcm`, `NAME.truth.png`, `NAME.clean.png` and
/// `NAME.truth.json` into `dir` (for a cine, also `NAME.truth_NNNN.png` and
/// `NAME.clean_NNNN.png` for frames after the first).
pub fn write_case(
    dir: &std::path::Path,
    name: &str,
    params: &PhantomParams,
) -> super::Result<Truth> {
    use crate::dicom::write::{uid_from, write_us_image, Colour, Identity, UsImage};
    let case = generate(name, params)?;
    let key = format!("sonoguide-phantom/{name}/{}", params.seed);
    let identity = Identity {
        patient_name: format!("Phantom^{name}"),
        patient_id: name.to_string(),
        study_uid: uid_from(format!("{key}/study").as_bytes()),
        series_uid: uid_from(format!("{key}/series").as_bytes()),
        sop_instance_uid: uid_from(format!("{key}/instance").as_bytes()),
        study_date: "20260101".into(),
        study_time: "120000".into(),
        series_description: format!("sonoguide phantom ({} scene)", case.truth.scene),
        extra: Vec::new(),
    };
    let image = UsImage {
        width: params.width,
        height: params.height,
        colour: Colour::Gray,
        frames: case
            .frames
            .iter()
            .map(|f| f.iter().copied().collect())
            .collect(),
        mm_per_px: Some((params.mm_per_px, params.mm_per_px)),
        region: case.truth.region,
        reference_px: (
            case.truth.reference_px[0].round() as i64,
            case.truth.reference_px[1].round() as i64,
        ),
        frame_time_ms: crate::dicom::write::DEFAULT_FRAME_TIME_MS,
        lossy: None,
        identity,
        derived_from: None,
    };
    write_us_image(&dir.join(format!("{name}.dcm")), &image)?;
    for (k, (labels, clean)) in case.labels.iter().zip(&case.clean).enumerate() {
        let suffix = if k == 0 {
            String::new()
        } else {
            format!("_{k:04}")
        };
        crate::imageio::write_gray_png(&dir.join(format!("{name}.truth{suffix}.png")), labels)?;
        crate::imageio::write_gray_png(&dir.join(format!("{name}.clean{suffix}.png")), clean)?;
    }
    crate::imageio::write_json(&dir.join(format!("{name}.truth.json")), &case.truth)?;
    Ok(case.truth)
}

/// Frame `k` of a generated phantom as the pipeline sees it: intensity, calibration
/// (with the reference pixel), and the imaging region (a fan mask for curved arrays).
pub fn frame_of(ph: &Phantom, k: usize) -> super::Result<crate::Frame> {
    use crate::frame::{Calibration, CalibrationSource, ImagingRegion, RegionShape, RegionSource};
    let img = ph
        .frames
        .get(k)
        .ok_or(crate::sim::SimError::InvalidParameter {
            name: "frame",
            reason: format!("{k} of {}", ph.frames.len()),
        })?;
    let (h, w) = img.dim();
    let pixels: Vec<u8> = img.iter().copied().collect();
    let t = &ph.truth;
    let calibration = Calibration::Ok {
        mm_per_px_x: t.spacing_mm[0],
        mm_per_px_y: t.spacing_mm[1],
        reference_px: Some((t.reference_px[0].round(), t.reference_px[1].round())),
        source: CalibrationSource::Given,
    };
    let mut frame = crate::Frame::from_gray8(w, h, &pixels, calibration)?;
    frame.index = k;
    frame.region = match t.geometry {
        Geometry::Linear => ImagingRegion {
            bounds: t.region,
            shape: RegionShape::Rectangle,
            source: RegionSource::UltrasoundRegion,
            mask: None,
            fan: None,
        },
        Geometry::Curved => {
            let conv = ScanConverter::new(w, h, t.spacing_mm[0]);
            let mask = Array2::from_shape_fn((h, w), |(y, x)| {
                u8::from(conv.image_to_beam(x as f64, y as f64).is_some())
            });
            ImagingRegion {
                bounds: t.region,
                shape: RegionShape::Sector,
                source: RegionSource::UltrasoundRegion,
                mask: Some(std::sync::Arc::new(mask)),
                fan: None,
            }
        }
    };
    Ok(frame)
}
