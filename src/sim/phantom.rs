//! Synthetic musculoskeletal ultrasound phantoms with ground truth.
//!
//! The image is formed the way a scanner forms it, not by adding noise to a picture:
//!
//! 1. An anatomy in tissue coordinates (mm), with sizes drawn from anatomy literature (each
//!    range carries its source below): skin (epidermis entry echo, dermis), subcutaneous fat
//!    with septa, a bright fascia, muscle bellies with perimysium striations at a random
//!    pennation angle, a fibrillar tendon that bends (0–15° of tilt), bone with hypoechoic
//!    cartilage, two bone ends with a joint recess and an anechoic effusion between them, a
//!    vessel (lumen and bright wall), and in some scenes a nerve in cross-section (hypoechoic
//!    fascicles in a hyperechoic epineurium, drawn from its own random stream so that adding
//!    it left every other draw as it was). Each structure has a backscatter power (echogenicity), an
//!    attenuation coefficient and a scatterer density.
//! 2. Complex Gaussian scatterers on the grid, amplitude √(echogenicity); sparse scatterers
//!    (partially developed speckle) in fat and in a few patches of muscle; the tendon's are
//!    modulated across and along its fibrils, and its backscatter falls with the angle between
//!    the beam and the fibre normal (anisotropy: a tilted part turns iso- or hypoechoic); the
//!    bone surface is a specular reflector (coherent phase) whose echo falls where the surface
//!    is steep.
//! 3. Two-way depth attenuation integrated down each column (bone stops the beam: acoustic
//!    shadow; fluid barely attenuates: posterior enhancement), partial (refraction) shadows
//!    below the edges of the bone ends, the tendon and the vessel, then time-gain compensation
//!    for the nominal tissue attenuation.
//! 4. What fills a real shadow: reverberations (decaying copies of the bone echo at multiples
//!    of the transducer-to-bone distance), comet tails (ring-down) below some points of the
//!    cortex, and a diffuse clutter haze 25–40 dB below the brightest tissue echo above the
//!    bone (fascia, tendon fibrils).
//! 5. Convolution with the point-spread function by FFT (rustfft): an axial Gaussian pulse
//!    whose length follows from the transmit frequency and bandwidth, and a lateral Gaussian beam
//!    of width λ·F#. The simulation runs on the IQ (baseband) signal, so the envelope is |IQ|.
//! 6. The scanner's settings, drawn from the seed like an operator's: transmit frequency
//!    (5–15 MHz linear, 2–5 MHz curved; lower for deeper images), depth (the image scale,
//!    0.06–0.15 mm/px at a fixed pixel size), overall gain (±6 dB), a TGC whose slope misses the
//!    tissue's attenuation by up to ±0.2 dB/cm/MHz, thermal noise that the TGC amplifies with
//!    depth, and log compression over a dynamic range of 40–70 dB.
//!
//! A curved-array phantom is simulated in beam space (angle × range) and scan-converted to a
//! fan. A cine moves the probe sideways over the same tissue (the speckle moves with it).
//!
//! Seeds: tune on 1–999 ([`TUNE_SEEDS`]), test on 50000 and above ([`TEST_SEEDS_FROM`]).

use std::f64::consts::PI;

use ndarray::{Array2, Array3};
use rustfft::num_complex::Complex;

use crate::fft::fft2;
use serde::Serialize;

use crate::frame::Rect;
use crate::label::Label;
use crate::plan::TargetKind;

/// Seeds to tune on (segmenter, planner thresholds).
pub const TUNE_SEEDS: std::ops::Range<u64> = 1..1000;
/// Seeds to test on: this one and above, never used while tuning.
pub const TEST_SEEDS_FROM: u64 = 50_000;

/// Probe geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Geometry {
    /// Linear array: rectangular image.
    Linear,
    /// Curved array: fan-shaped image.
    Curved,
}

impl Geometry {
    /// The probe of case `seed` in a mixed set: a curved array for about a third of the seeds
    /// (from its own generator, so the anatomy of a seed does not depend on it).
    pub fn for_seed(seed: u64) -> Geometry {
        let mut r = Rng::new(seed ^ 0x0C0F_FEE0_DDBA_11ED);
        if r.unit() < 1.0 / 3.0 {
            Geometry::Curved
        } else {
            Geometry::Linear
        }
    }
}

/// Settings of one phantom case. The scanner settings left `None` are drawn from the seed.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PhantomParams {
    /// Output columns.
    pub width: usize,
    /// Output rows.
    pub height: usize,
    /// Millimetres per pixel (both axes). `None`: the operator's depth for the anatomy
    /// (15–60 mm, bone at 40–80 % of it), i.e. [`MM_PER_PX_RANGE`] at this pixel size.
    pub mm_per_px: Option<f64>,
    /// Frames (1 = still image; more = the probe slides sideways).
    pub frames: usize,
    /// Probe geometry.
    pub geometry: Geometry,
    /// Seed of every random choice.
    pub seed: u64,
    /// Transmit frequency in MHz. `None`: 5–15 MHz linear (at most 60 / depth in cm),
    /// 2–5 MHz curved.
    pub frequency_mhz: Option<f64>,
    /// Lateral probe motion per frame, in pixels.
    pub motion_px_per_frame: usize,
    /// Log-compression dynamic range, dB. `None`: 40–70 dB.
    pub dynamic_range_db: Option<f64>,
    /// Overall receive gain, dB (0: tissue at its nominal grey). `None`: −6 to +6 dB.
    pub gain_db: Option<f64>,
}

impl Default for PhantomParams {
    fn default() -> Self {
        PhantomParams {
            width: 480,
            height: 360,
            mm_per_px: None,
            frames: 1,
            geometry: Geometry::Linear,
            seed: 1,
            frequency_mhz: None,
            motion_px_per_frame: 1,
            dynamic_range_db: None,
            gain_db: None,
        }
    }
}

impl PhantomParams {
    /// The same settings with the scanner fixed at the old nominal values (0.08 mm/px,
    /// 7.5 MHz, 60 dB dynamic range, no extra gain), for benches that must time one scene.
    /// The TGC error, noise level and anatomy still come from the seed.
    pub fn with_nominal_scanner(mut self) -> Self {
        self.mm_per_px = Some(0.08);
        self.frequency_mhz = Some(7.5);
        self.dynamic_range_db = Some(60.0);
        self.gain_db = Some(0.0);
        self
    }
}

/// Image scale drawn when not given, mm per pixel (the image size stays as asked).
pub const MM_PER_PX_RANGE: (f64, f64) = (0.06, 0.15);
/// Imaging depth an operator picks, mm.
pub const DEPTH_RANGE_MM: (f64, f64) = (15.0, 60.0);
/// Transmit frequency of linear arrays, MHz.
pub const LINEAR_FREQUENCY_MHZ: (f64, f64) = (5.0, 15.0);
/// Transmit frequency of curved arrays, MHz.
pub const CURVED_FREQUENCY_MHZ: (f64, f64) = (2.0, 5.0);
/// Log-compression dynamic range, dB.
pub const DYNAMIC_RANGE_DB_RANGE: (f64, f64) = (40.0, 70.0);
/// Overall gain, dB.
pub const GAIN_DB_RANGE: (f64, f64) = (-6.0, 6.0);
/// Largest mismatch between the TGC slope and the tissue's attenuation, dB/cm/MHz.
pub const TGC_ERROR_DB_CM_MHZ: f64 = 0.2;
/// The TGC error's effect on the image is bounded: an operator corrects a gradient larger
/// than this (dB, either way).
const TGC_ERROR_CAP_DB: f64 = 6.0;

/// Mean of 10·log10 of an exponentially distributed power relative to the log of its mean
/// (−γ·10/ln 10): fully developed speckle sits this far below its mean power after log
/// compression. The clean map includes it so that it is what an ideal despeckler returns.
const LOG_SPECKLE_BIAS_DB: f64 = -2.5068;
/// Where muscle sits in the log-compression window at zero gain: this share of the dynamic
/// range below its top (33 dB of 60: grey 115 of 255 at any dynamic range).
const MUSCLE_BELOW_TOP: f64 = 0.55;
/// Speed of sound in soft tissue, mm/µs.
const SOUND_SPEED_MM_PER_US: f64 = 1.54;
/// Fractional −6 dB bandwidth of the transmit pulse.
const FRACTIONAL_BANDWIDTH: f64 = 0.5;
/// Receive F-number of the lateral beam.
const F_NUMBER: f64 = 2.0;
/// Soft-tissue attenuation, dB/cm/MHz (one way).
const TISSUE_ATTEN_DB_CM_MHZ: f64 = 0.5;
/// The bone label band: from this far above the bone surface (mm) ...
const BONE_BAND_ABOVE: f64 = 0.2;
/// ... to this far below it.
const BONE_BAND_BELOW: f64 = 0.3;
/// Thickness of the specular part of a bone (and reverberation) echo, mm.
const SPECULAR_MM: f64 = 0.15;

/// Backscatter power of each tissue, relative to muscle.
mod echo {
    pub const ENTRY: f64 = 30.0;
    pub const DERMIS: f64 = 5.0;
    pub const FAT: f64 = 0.3;
    pub const SEPTUM: f64 = 3.0;
    pub const FASCIA: f64 = 10.0;
    pub const MUSCLE: f64 = 1.0;
    pub const TENDON: f64 = 12.0;
    pub const CARTILAGE: f64 = 0.04;
    pub const CARTILAGE_SURFACE: f64 = 3.0;
    pub const FLUID: f64 = 0.0005;
    pub const BONE: f64 = 2500.0;
    pub const VESSEL_WALL: f64 = 15.0;
    /// Epineurium and the fat between fascicles: brighter than muscle.
    pub const EPINEURIUM: f64 = 10.0;
    /// Fascicles: hypoechoic, darker than muscle but not anechoic.
    pub const FASCICLE: f64 = 0.12;
}

/// A structure a needle must avoid, in mm of the first frame.
#[derive(Debug, Clone, Serialize)]
pub struct Forbidden {
    /// `"bone"`, `"vessel"` or `"nerve"`.
    pub kind: &'static str,
    /// Polyline (bone) or centre (vessel), px.
    pub points_px: Vec<[f64; 2]>,
    /// The same in mm.
    pub points_mm: Vec<[f64; 2]>,
    /// Radius in mm (vessels; the larger half axis for nerves).
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

/// The fan of a curved array, in the image.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CurvedTruth {
    /// Centre of curvature of the array (column, row; the row is negative: above the image).
    pub apex_px: [f64; 2],
    /// Radius of the array's face, mm.
    pub radius_mm: f64,
    /// Half the fan's opening angle, degrees.
    pub half_angle_deg: f64,
}

/// What the phantom contains, written as `NAME.truth.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Truth {
    /// Case name.
    pub name: String,
    /// Seed.
    pub seed: u64,
    /// Always `"phantom"`.
    pub source: &'static str,
    /// Geometry.
    pub geometry: Geometry,
    /// Columns and rows.
    pub size_px: [usize; 2],
    /// Millimetres per pixel (x, y).
    pub spacing_mm: [f64; 2],
    /// Reference pixel (column, row): lateral 0 and depth 0 (transducer face).
    pub reference_px: [f64; 2],
    /// The imaging region, px (end exclusive): for a curved array the fan's bounding
    /// rectangle, as the DICOM declares it.
    pub region: Rect,
    /// The fan (curved arrays only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub curved: Option<CurvedTruth>,
    /// `"joint"`, `"bone"` or `"soft_tissue"`.
    pub scene: &'static str,
    /// `"joint_space"`, `"effusion"` or `"peritendinous"`.
    pub target_kind: TargetKind,
    /// How far from the ideal target a needle tip still hits the target structure, mm (half
    /// its smaller dimension, at least 1 mm).
    pub target_tolerance_mm: f64,
    /// Transmit frequency, MHz.
    pub frequency_mhz: f64,
    /// Imaging depth (range of the last row), mm.
    pub depth_mm: f64,
    /// Log-compression dynamic range, dB.
    pub dynamic_range_db: f64,
    /// Overall gain, dB.
    pub gain_db: f64,
    /// The TGC slope's mismatch to the tissue attenuation, dB/cm/MHz (positive: the deep image
    /// is too bright).
    pub tgc_error_db_cm_mhz: f64,
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
    /// −1 or +1.
    fn sign(&mut self) -> f64 {
        if self.unit() < 0.5 {
            -1.0
        } else {
            1.0
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Scene {
    Joint,
    Bone,
    SoftTissue,
}

/// Perimysium striations of one muscle belly: fibre angle to the probe face (rad), spacing
/// (mm), phase, brightness, sharpness of the lines.
type Striations = (f64, f64, f64, f64, f64);

/// A comet tail (ring-down) below the cortex: lateral position (mm, or a share of the width
/// before the layout), half width (mm), length (mm), ring spacing (mm), level below the bone
/// echo (dB), decay (dB/mm).
#[derive(Debug, Clone, Copy)]
struct Comet {
    u: f64,
    half_width: f64,
    length: f64,
    spacing: f64,
    level_db: f64,
    decay_db_mm: f64,
}

/// A partial (edge / refraction) shadow: lateral centre and start depth (mm), half width (mm),
/// strength (dB).
#[derive(Debug, Clone, Copy)]
struct EdgeShadow {
    u: f64,
    from_depth: f64,
    half_width: f64,
    db: f64,
}

/// Every random choice of the anatomy, drawn before the image scale is known: depths in mm,
/// lateral positions as shares of the image width (the layout happens in [`Anatomy::build`]).
#[derive(Debug, Clone)]
struct Draws {
    scene: Scene,
    entry_mm: f64,
    skin_mm: f64,
    fat_mm: f64,
    fascia_mm: f64,
    tendon_gap_mm: f64,
    tendon_thick: f64,
    bone_gap_mm: f64,
    cartilage_mm: f64,
    effusion_height: f64,
    recess_depth: f64,
    end_radius: f64,
    bone_wave: (f64, f64, f64),
    bone_step: f64,
    /// Intermuscular fascia: depth below the tendon's deepest point (mm), slope, thickness.
    inter_fascia: Option<(f64, f64, f64)>,
    gap_w: f64,
    gap_c: f64,
    effusion_ext: (f64, f64),
    bursa: Option<(f64, f64)>,
    tendon_u: (f64, f64),
    tilt_deg: f64,
    bend_deg: f64,
    bend_c: f64,
    bend_half_mm: f64,
    fibre_period: f64,
    fibrils: Vec<(f64, f64, f64)>,
    aniso_n: f64,
    aniso_floor: f64,
    /// Depth share in the fat, slope, thickness (mm), start (share of width), length (share).
    septa: Vec<(f64, f64, f64, f64, f64)>,
    muscles: [Striations; 2],
    /// Diameter (mm), the small diameter to fall back on, lateral share, depth share.
    vessel: Option<(f64, f64, f64, f64)>,
    /// A nerve in cross-section.
    nerve: Option<NerveDraw>,
    comets: Vec<Comet>,
    /// Partially developed speckle in muscle: lateral share, depth share of the muscle layer,
    /// half axes (mm), scatterer density.
    sparse: Vec<(f64, f64, f64, f64, f64)>,
    fat_density: f64,
    bone_roughness_exp: f64,
    bone_edge: (f64, f64),
    tendon_edge: (f64, f64),
    vessel_edge: (f64, f64),
    /// dB below the tissue above, lateral variation (dB), its period (mm) and phase, and the
    /// change with depth below the bone (dB/mm).
    clutter: (f64, f64, f64, f64, f64),
    reverb_db: f64,
}

/// A peripheral nerve in cross-section (short axis): the "honeycomb" of hypoechoic fascicles
/// in a hyperechoic epineurium. Cross-sectional areas of healthy nerves (Cartwright MS et al.,
/// Muscle Nerve 2008;37:566-571): median at the wrist about 9 mm², ulnar at the elbow about
/// 6 mm², tibial at the ankle about 11 mm², sural about 2-3 mm², i.e. 1.5-5 mm across; the
/// median nerve is flattened at the wrist (flattening ratio up to about 3). Fascicles number
/// from a few (sural) to some 20-30 (median, sciatic branches) and measure 0.2-1 mm
/// (Sunderland, "Nerves and Nerve Injuries", 1978).
#[derive(Debug, Clone)]
struct NerveDraw {
    /// Cross-sectional area, mm².
    area_mm2: f64,
    /// Short over long axis (1: round).
    aspect: f64,
    /// Lateral share and depth share of the free band.
    at: (f64, f64),
    /// Fascicles: centre in the unit disc (x, y) and radius as a share of the nerve's radius.
    fascicles: Vec<(f64, f64, f64)>,
    /// Epineurium thickness, mm.
    rim_mm: f64,
}

/// A nerve laid out in the anatomy.
#[derive(Debug, Clone)]
struct PlacedNerve {
    /// Centre (u, d), mm.
    centre: (f64, f64),
    /// Half axes (lateral, depth), mm.
    half: (f64, f64),
    draw: NerveDraw,
}

/// Draws a nerve for a scene from its own stream of random numbers (so that every other
/// draw of the phantom stays as it was).
fn nerve_draw(seed: u64, scene: Scene) -> Option<NerveDraw> {
    let mut rng = Rng::new(seed ^ 0x4E45_5256_455F_3133);
    let p = if scene == Scene::SoftTissue { 0.7 } else { 0.4 };
    if rng.unit() >= p {
        return None;
    }
    let area_mm2 = rng.range(2.0, 14.0);
    let aspect = rng.range(0.35, 1.0);
    let n = rng.range(4.0, 22.0) as usize;
    let mut fascicles: Vec<(f64, f64, f64)> = Vec::new();
    for _ in 0..n * 8 {
        if fascicles.len() >= n {
            break;
        }
        let r = rng.range(0.14, 0.32);
        let (x, y) = (rng.range(-1.0, 1.0), rng.range(-1.0, 1.0));
        let fits = (x.hypot(y) + r) < 0.85;
        let apart = fascicles
            .iter()
            .all(|&(fx, fy, fr)| (x - fx).hypot(y - fy) > r + fr + 0.04);
        if fits && apart {
            fascicles.push((x, y, r));
        }
    }
    Some(NerveDraw {
        area_mm2,
        aspect,
        at: (rng.range(0.12, 0.88), rng.unit()),
        fascicles,
        rim_mm: rng.range(0.15, 0.3),
    })
}

fn striations(rng: &mut Rng) -> Striations {
    // Pennation of limb muscles at rest spans roughly 5–30°, either way on the screen.
    (
        rng.range(-25.0f64, 25.0).to_radians(),
        rng.range(0.7, 2.0),
        rng.range(0.0, 2.0 * PI),
        rng.range(0.6, 2.0),
        rng.range(4.0, 10.0),
    )
}

impl Draws {
    fn random(rng: &mut Rng) -> Draws {
        let r = rng.unit();
        let scene = if r < 0.55 {
            Scene::Joint
        } else if r < 0.8 {
            Scene::Bone
        } else {
            Scene::SoftTissue
        };
        let entry_mm = rng.range(0.08, 0.15);
        // Skin (epidermis + dermis): 20 MHz ultrasound of 22 sites, extremity skin thinner
        // than truncal ("High-frequency ultrasound characterization of normal skin. Skin
        // thickness and echographic density of 22 anatomical sites", Skin Res Technol 1995;
        // high-frequency dermis/epidermis maps of 13 sites, PMID 36331142): 1.5–3 mm.
        let skin_mm = rng.range(1.5, 3.0);
        // Subcutaneous fat over limbs and joints: a few mm in lean adults, well over 10 mm in
        // obese ones (Störchle et al., Sci Rep 2018, eight standardised ultrasound sites);
        // the lean-to-average end: 1.5–8 mm.
        let fat_mm = rng.range(1.5, 8.0);
        let fascia_mm = rng.range(0.2, 0.5);
        let tendon_gap_mm = rng.range(0.3, 3.0);
        // Tendon thickness: patellar 3–7 mm (normal proximal 5.1 mm, tendinopathy cut-off
        // 7 mm: J Clin Med 2021;10:4092), Achilles 4–7 mm (normative midportion 4.9–5.9 mm,
        // 2.5th–97.5th percentile 3.1–8.4 mm: Sleeswijk Visser et al., international
        // normative study; 4.4–4.6 mm: Int J Biomed 2023;13:95), supraspinatus 4–8 mm
        // (Cholewinski et al., KSSTA 2008;16:408; rotator cuff dimensions in Korean healthy
        // adults): 3–7.5 mm.
        let tendon_thick = rng.range(3.0, 7.5);
        let bone_gap_mm = rng.range(1.0, 6.0);
        // Articular cartilage: femoral 1.95 mm (medial condyle) to 3.17 mm (sulcus) by
        // ultrasound (Kauppinen et al., ScientificWorld J 2021:9978819), 1.7–1.9 mm in healthy
        // adults (femoral cartilage in knee OA and healthy adults, 2023); small joints under
        // 1 mm: 0.8–3 mm (was 0.8–1.4).
        let cartilage_mm = rng.range(0.8, 3.0);
        // Synovial fluid depth: a few mm in normal recesses, effusion usually called from
        // 4–5 mm (Mandl et al. 2012, fluid in knee recesses at 0–90° flexion, 14 centres;
        // Li, J Diagn Med Sonogr 2020;36:545): effusion 1.5–6 mm (was 1.2–2.5), joint recess
        // 1.5–4 mm (was 1.5–2.5).
        let effusion_height = rng.range(1.5, 6.0);
        let recess_depth = rng.range(1.5, 4.0);
        let end_radius = rng.range(2.5, 5.0);
        let bone_wave = (
            rng.range(0.2, 0.7),
            rng.range(25.0, 50.0),
            rng.range(0.0, 2.0 * PI),
        );
        let bone_step = rng.range(-1.0, 1.0);
        let has_inter = rng.unit() < 0.6;
        let inter = (
            rng.range(2.0, 12.0),
            rng.range(-0.15, 0.15),
            rng.range(0.15, 0.35),
        );
        let gap_w = rng.range(3.0, 6.0);
        let gap_c = rng.range(0.4, 0.6);
        let effusion_ext = (rng.range(1.5, 3.0), rng.range(1.5, 3.0));
        let has_bursa = rng.unit() < 0.5;
        let bursa = (rng.range(0.3, 0.7), rng.range(4.0, 8.0));
        let tendon_u = (rng.range(-0.35, 0.12), rng.range(0.88, 1.35));
        // The tendon's tilt to the probe face: within 2° overall (the operator aligns the probe)
        // and a bend of up to 15° (a tendon diving to its insertion, or curving over bone).
        let tilt_deg = rng.range(-2.0, 2.0);
        let bend_deg = rng.range(0.0, 15.0) * rng.sign();
        let bend_c = rng.range(0.15, 0.85);
        let bend_half_mm = rng.range(3.0, 10.0);
        let fibre_period = rng.range(0.25, 0.5);
        let fibrils = (0..128)
            .map(|_| {
                (
                    rng.range(0.35, 1.0),
                    rng.range(3.0, 12.0),
                    rng.range(0.0, 2.0 * PI),
                )
            })
            .collect();
        // Anisotropy: tendon scanned perpendicular is brighter than muscle, isoechoic to it at
        // 2–7° and hypoechoic beyond (Crass, van de Vegte, Harkavy, Radiology 1988;167:499).
        // Backscatter ∝ floor + (1 − floor)·cosⁿθ, n set by the isoechoic angle.
        let iso_deg = rng.range(2.0, 7.0);
        let aniso_floor = rng.range(0.02, 0.06);
        let aniso_n = ((echo::MUSCLE / echo::TENDON - aniso_floor) / (1.0 - aniso_floor)).ln()
            / iso_deg.to_radians().cos().ln();
        let n_septa = rng.range(1.0, 5.0) as usize;
        let septa = (0..n_septa)
            .map(|_| {
                (
                    rng.range(0.15, 0.9),
                    rng.range(-0.25, 0.25),
                    rng.range(0.08, 0.2),
                    rng.range(-0.2, 0.6),
                    rng.range(0.3, 1.2),
                )
            })
            .collect();
        let muscles = [striations(rng), striations(rng)];
        // Vessels: radial artery 2.3 ± 0.4 mm (Beniwal et al., Indian Heart J 2014;66:506),
        // 3.0 mm mean in 565 patients (J Invasive Cardiol 2023;35:E143); dorsalis pedis about
        // 2 mm and popliteal 5–7 mm (lower-limb artery calibres in 228 healthy adults,
        // J Ultrason 2012;12:420). Small arteries 1.8–3.4 mm, a quarter large ones 4.5–7 mm
        // (diameters; was 1.8–3.6 mm).
        let has_vessel = rng.unit() < 0.6;
        let large = rng.unit() < 0.25;
        let small_d = rng.range(1.8, 3.4);
        let large_d = rng.range(4.5, 7.0);
        let vessel_at = (rng.range(0.12, 0.88), rng.unit());
        let n_comets = if rng.unit() < 0.4 {
            1 + usize::from(rng.unit() < 0.3)
        } else {
            0
        };
        let comets = (0..n_comets)
            .map(|_| Comet {
                u: rng.range(0.1, 0.9),
                half_width: rng.range(0.2, 0.5),
                length: rng.range(2.0, 6.0),
                spacing: rng.range(0.2, 0.45),
                level_db: rng.range(14.0, 22.0),
                decay_db_mm: rng.range(2.0, 5.0),
            })
            .collect();
        let n_sparse = rng.range(0.0, 3.0) as usize;
        let sparse = (0..n_sparse)
            .map(|_| {
                (
                    rng.range(0.1, 0.9),
                    rng.range(0.1, 0.9),
                    rng.range(2.0, 6.0),
                    rng.range(1.5, 4.0),
                    rng.range(0.05, 0.4),
                )
            })
            .collect();
        let fat_density = rng.range(0.2, 1.0);
        let bone_roughness_exp = rng.range(4.0, 12.0);
        let bone_edge = (rng.range(0.3, 0.8), rng.range(5.0, 15.0));
        let tendon_edge = (rng.range(0.2, 0.6), rng.range(4.0, 12.0));
        let vessel_edge = (rng.range(0.15, 0.4), rng.range(3.0, 10.0));
        let clutter = (
            rng.range(25.0, 40.0),
            rng.range(0.0, 4.0),
            rng.range(8.0, 25.0),
            rng.range(0.0, 2.0 * PI),
            rng.range(-0.15, 0.15),
        );
        let reverb_db = rng.range(22.0, 30.0);
        Draws {
            scene,
            entry_mm,
            skin_mm,
            fat_mm,
            fascia_mm,
            tendon_gap_mm,
            tendon_thick,
            bone_gap_mm,
            cartilage_mm,
            effusion_height,
            recess_depth,
            end_radius,
            bone_wave,
            bone_step,
            inter_fascia: has_inter.then_some(inter),
            gap_w,
            gap_c,
            effusion_ext,
            bursa: (scene == Scene::Bone && has_bursa).then_some(bursa),
            tendon_u,
            tilt_deg,
            bend_deg,
            bend_c,
            bend_half_mm,
            fibre_period,
            fibrils,
            aniso_n,
            aniso_floor,
            septa,
            muscles,
            vessel: has_vessel.then_some((
                if large { large_d } else { small_d },
                small_d,
                vessel_at.0,
                vessel_at.1,
            )),
            nerve: None,
            comets,
            sparse,
            fat_density,
            bone_roughness_exp,
            bone_edge,
            tendon_edge,
            vessel_edge,
            clutter,
            reverb_db,
        }
    }

    fn has_fluid_over_bone(&self) -> bool {
        self.scene == Scene::Joint || self.bursa.is_some()
    }

    /// Depth of the deepest structure of interest with the tendon flat: what an operator sets
    /// the depth for.
    fn nominal_depth(&self) -> f64 {
        let tendon_bottom =
            self.skin_mm + self.fat_mm + self.fascia_mm + self.tendon_gap_mm + self.tendon_thick;
        match self.scene {
            Scene::SoftTissue => tendon_bottom + self.bone_gap_mm + 3.0,
            _ => {
                tendon_bottom
                    + self.bone_gap_mm
                    + if self.has_fluid_over_bone() {
                        self.effusion_height
                    } else {
                        0.0
                    }
                    + self.cartilage_mm
                    + self.bone_wave.0
            }
        }
    }

    /// The same anatomy with every depth (and the tendon's tilt) scaled by `k`.
    fn scaled(&self, k: f64) -> Draws {
        let mut d = self.clone();
        d.skin_mm *= k;
        d.fat_mm *= k;
        d.tendon_gap_mm *= k;
        d.tendon_thick *= k;
        d.bone_gap_mm *= k;
        d.cartilage_mm *= k;
        d.effusion_height *= k;
        d.recess_depth *= k;
        d.end_radius *= k;
        d.bone_wave.0 *= k;
        d.tilt_deg *= k;
        d.bend_deg *= k;
        if let Some(f) = d.inter_fascia.as_mut() {
            f.0 *= k;
        }
        d
    }
}

/// What the beam meets at one point.
#[derive(Debug, Clone, Copy)]
struct Tissue {
    /// Backscatter power relative to muscle.
    echo: f64,
    /// One-way attenuation, dB/cm/MHz.
    atten: f64,
    label: u8,
    /// A mirror-like interface (coherent phase).
    specular: bool,
    /// Share of grid points holding a scatterer (1: fully developed speckle).
    density: f64,
}

impl Tissue {
    fn diffuse(echo: f64, atten: f64, label: Label) -> Tissue {
        Tissue {
            echo,
            atten,
            label: label.code(),
            specular: false,
            density: 1.0,
        }
    }
}

/// Step of the tendon's depth table, mm.
const TENDON_STEP_MM: f64 = 0.02;

/// The anatomy, in tissue millimetres (u lateral, d depth).
#[derive(Debug, Clone)]
struct Anatomy {
    scene: Scene,
    entry_mm: f64,
    skin_mm: f64,
    fat_mm: f64,
    fascia_bottom: f64,
    /// Depth at u = 0, slope, thickness, first and last u.
    septa: Vec<(f64, f64, f64, f64, f64)>,
    muscles: [Striations; 2],
    /// Depth at u = 0, slope, thickness.
    inter_fascia: Option<(f64, f64, f64)>,
    tendon_u: (f64, f64),
    /// Tendon top depth from u = −TENDON_MARGIN in steps of TENDON_STEP_MM.
    tendon_top: Vec<f64>,
    tendon_thick: f64,
    tilt: f64,
    bend: f64,
    bend_c: f64,
    bend_half: f64,
    fibre_period: f64,
    fibrils: Vec<(f64, f64, f64)>,
    aniso_n: f64,
    aniso_floor: f64,
    bone_base: [f64; 2],
    bone_wave: (f64, f64, f64),
    gap: (f64, f64),
    end_radius: f64,
    cartilage_mm: f64,
    effusion_height: f64,
    effusion_u: (f64, f64),
    recess_depth: f64,
    vessel: Option<(f64, f64, f64)>,
    nerve: Option<PlacedNerve>,
    comets: Vec<Comet>,
    /// Centre (u, d), half axes, density.
    sparse: Vec<(f64, f64, f64, f64, f64)>,
    fat_density: f64,
    bone_roughness_exp: f64,
    edges: Vec<EdgeShadow>,
    clutter: (f64, f64, f64, f64, f64),
    reverb_db: f64,
    width_mm: f64,
}

/// How far the tendon table reaches beyond the canvas, mm.
const TENDON_MARGIN: f64 = 5.0;

impl Anatomy {
    /// Lays `draws` out on an image `width_mm` wide (frame 0) over a canvas `canvas_mm` wide
    /// (all frames of a cine) and `depth_mm` deep; shrinks the depths when the anatomy does
    /// not fit (bone deeper than 85 % of the depth).
    fn build(draws: &Draws, width_mm: f64, canvas_mm: f64, depth_mm: f64) -> Anatomy {
        let mut d = draws.clone();
        let mut a = Anatomy::layout(&d, width_mm, canvas_mm, depth_mm);
        for _ in 0..8 {
            let deepest = a.deepest();
            if deepest <= 0.85 * depth_mm {
                break;
            }
            d = d.scaled((0.85 * depth_mm / deepest).max(0.5) * 0.97);
            a = Anatomy::layout(&d, width_mm, canvas_mm, depth_mm);
        }
        a
    }

    /// The deepest structure that must be in the image.
    fn deepest(&self) -> f64 {
        match self.scene {
            Scene::SoftTissue => self.tendon_deepest() + 2.0,
            Scene::Joint => {
                self.bone_base[0].max(self.bone_base[1])
                    + self.bone_wave.0
                    + 0.8 * self.end_radius
                    + 0.5
            }
            Scene::Bone => self.bone_base[0] + self.bone_wave.0 + 0.5,
        }
    }

    fn tendon_visible(&self) -> (f64, f64) {
        let last = (self.tendon_top.len() - 1) as f64 * TENDON_STEP_MM - TENDON_MARGIN;
        (self.tendon_u.0.max(0.0), self.tendon_u.1.min(last))
    }

    fn tendon_deepest(&self) -> f64 {
        let (a, b) = self.tendon_visible();
        let mut m = f64::MIN;
        let mut u = a;
        while u <= b {
            m = m.max(self.tendon_top_at(u));
            u += 0.1;
        }
        m + self.tendon_thick
    }

    fn layout(d: &Draws, width_mm: f64, canvas_mm: f64, depth_mm: f64) -> Anatomy {
        let fascia_top = d.skin_mm + d.fat_mm;
        let fascia_bottom = fascia_top + d.fascia_mm;
        let tendon_u = (width_mm * d.tendon_u.0, width_mm * d.tendon_u.1);
        let mut a = Anatomy {
            scene: d.scene,
            entry_mm: d.entry_mm,
            skin_mm: d.skin_mm,
            fat_mm: d.fat_mm,
            fascia_bottom,
            septa: d
                .septa
                .iter()
                .map(|&(share, slope, thick, u0, len)| {
                    let u0 = u0 * width_mm;
                    let depth = d.skin_mm + share * d.fat_mm;
                    (depth - slope * u0, slope, thick, u0, u0 + len * width_mm)
                })
                .collect(),
            muscles: d.muscles,
            inter_fascia: None,
            tendon_u,
            tendon_top: Vec::new(),
            tendon_thick: d.tendon_thick,
            tilt: d.tilt_deg.to_radians(),
            bend: d.bend_deg.to_radians(),
            bend_c: d.bend_c * width_mm,
            bend_half: d.bend_half_mm,
            fibre_period: d.fibre_period,
            fibrils: d.fibrils.clone(),
            aniso_n: d.aniso_n,
            aniso_floor: d.aniso_floor,
            bone_base: [0.0; 2],
            bone_wave: d.bone_wave,
            gap: (0.0, 0.0),
            end_radius: d.end_radius,
            cartilage_mm: d.cartilage_mm,
            effusion_height: d.effusion_height,
            effusion_u: (0.0, 0.0),
            recess_depth: d.recess_depth,
            vessel: None,
            nerve: None,
            comets: Vec::new(),
            sparse: Vec::new(),
            fat_density: d.fat_density,
            bone_roughness_exp: d.bone_roughness_exp,
            edges: Vec::new(),
            clutter: d.clutter,
            reverb_db: d.reverb_db,
            width_mm,
        };
        // The tendon's top: the integral of its slope, shifted so that its shallowest visible
        // point sits `tendon_gap_mm` below the fascia.
        let n = ((canvas_mm + 2.0 * TENDON_MARGIN) / TENDON_STEP_MM).ceil() as usize + 2;
        let mut path = Vec::with_capacity(n);
        let mut acc = 0.0;
        for i in 0..n {
            let u = i as f64 * TENDON_STEP_MM - TENDON_MARGIN;
            path.push(acc);
            acc += a.tendon_angle(u).tan() * TENDON_STEP_MM;
        }
        a.tendon_top = path;
        let (v0, v1) = a.tendon_visible();
        let mut shallowest = f64::MAX;
        let mut u = v0;
        while u <= v1 {
            shallowest = shallowest.min(a.tendon_top_at(u));
            u += 0.1;
        }
        let shift = fascia_bottom + d.tendon_gap_mm - shallowest;
        for t in a.tendon_top.iter_mut() {
            *t += shift;
        }
        let tendon_bottom = a.tendon_deepest();
        // Bone below the tendon, the fat pad or deep muscle, the fluid and the cartilage.
        let bone = tendon_bottom
            + d.bone_gap_mm
            + if d.has_fluid_over_bone() {
                d.effusion_height
            } else {
                0.0
            }
            + d.cartilage_mm
            + d.bone_wave.0;
        a.bone_base = [bone + d.bone_step.max(0.0), bone + (-d.bone_step).max(0.0)];
        let gap_c = width_mm * d.gap_c;
        a.gap = (gap_c - d.gap_w / 2.0, gap_c + d.gap_w / 2.0);
        match d.scene {
            Scene::Joint => {
                a.effusion_u = (a.gap.0 - d.effusion_ext.0, a.gap.1 + d.effusion_ext.1);
            }
            Scene::Bone => {
                if let Some((c, w)) = d.bursa {
                    let c = width_mm * c;
                    a.effusion_u = (c - w / 2.0, c + w / 2.0);
                }
            }
            Scene::SoftTissue => {}
        }
        let muscle_floor = match d.scene {
            Scene::SoftTissue => depth_mm,
            _ => a.bone_base[0].min(a.bone_base[1]) - d.bone_wave.0,
        };
        if let Some((below, slope, thick)) = d.inter_fascia {
            let depth = tendon_bottom + below;
            if depth < muscle_floor - 1.0 {
                a.inter_fascia = Some((depth - slope * width_mm / 2.0, slope, thick));
            }
        }
        if let Some((diameter, small, us, ds)) = d.vessel {
            for dia in [diameter, small] {
                if let Some(v) = a.place_vessel(dia / 2.0, us, ds, depth_mm) {
                    a.vessel = Some(v);
                    break;
                }
            }
        }
        if let Some(n) = &d.nerve {
            // Half axes from the area: π·a·b = area, b = aspect·a.
            let ha = (n.area_mm2 / (PI * n.aspect)).sqrt();
            let hb = ha * n.aspect;
            // At the drawn place, else the first of a few others where it fits clear of the
            // vessel (nerves run beside vessels, not through them).
            let tries = [
                n.at.0,
                n.at.0 + 0.3,
                n.at.0 - 0.3,
                n.at.0 + 0.55,
                n.at.0 - 0.55,
            ];
            for us in tries.map(|u| u.rem_euclid(1.0).clamp(0.1, 0.9)) {
                // Beneath the tendon like a vessel, else in the muscle between the fascia and
                // the tendon (an intermuscular plane).
                let r = ha.max(hb);
                let above = || {
                    let u = us * width_mm;
                    let top = a.fascia_bottom + hb + 0.4;
                    let bottom = a.tendon_range(u).map_or(depth_mm * 0.5, |(t, _)| t) - hb - 0.4;
                    (bottom > top).then_some((u, top + n.at.1 * (bottom - top), r))
                };
                let Some((u, dd, _)) = a.place_vessel(r, us, n.at.1, depth_mm).or_else(above)
                else {
                    continue;
                };
                let clear = a
                    .vessel
                    .is_none_or(|(vu, vd, vr)| (vu - u).hypot(vd - dd) > vr + ha + 1.0);
                if clear {
                    a.nerve = Some(PlacedNerve {
                        centre: (u, dd),
                        half: (ha, hb),
                        draw: n.clone(),
                    });
                    break;
                }
            }
        }
        a.comets = d
            .comets
            .iter()
            .map(|c| Comet {
                u: c.u * width_mm,
                ..*c
            })
            .filter(|c| d.scene != Scene::SoftTissue && a.has_bone_at(c.u))
            .collect();
        a.sparse = d
            .sparse
            .iter()
            .map(|&(us, ds, ru, rd, density)| {
                let top = fascia_bottom;
                let bottom = muscle_floor.min(depth_mm).max(top + 2.0);
                (us * width_mm, top + ds * (bottom - top), ru, rd, density)
            })
            .collect();
        // Partial shadows: below the rounded bone ends, the tendon's ends, the vessel's sides.
        if d.scene == Scene::Joint {
            let (hw, db) = d.bone_edge;
            a.edges.push(EdgeShadow {
                u: a.gap.0 + 0.2 * hw,
                from_depth: a.bone_depth(a.gap.0 - 0.5 * a.end_radius),
                half_width: hw,
                db,
            });
            a.edges.push(EdgeShadow {
                u: a.gap.1 - 0.2 * hw,
                from_depth: a.bone_depth(a.gap.1 + 0.5 * a.end_radius),
                half_width: hw,
                db,
            });
        }
        for end in [tendon_u.0, tendon_u.1] {
            if end > -1.0 && end < canvas_mm + 1.0 {
                let (hw, db) = d.tendon_edge;
                a.edges.push(EdgeShadow {
                    u: end,
                    from_depth: a.tendon_top_at(end) + 0.5 * a.tendon_thick,
                    half_width: hw,
                    db,
                });
            }
        }
        if let Some((vu, vd, vr)) = a.vessel {
            let (hw, db) = d.vessel_edge;
            for side in [-1.0, 1.0] {
                a.edges.push(EdgeShadow {
                    u: vu + side * vr,
                    from_depth: vd,
                    half_width: hw,
                    db,
                });
            }
        }
        a
    }

    /// A vessel of radius `r` at lateral share `us` and depth share `ds` of the free band
    /// between the tendon and the bone (or the image bottom), if it fits.
    fn place_vessel(&self, r: f64, us: f64, ds: f64, depth_mm: f64) -> Option<(f64, f64, f64)> {
        let w = self.width_mm;
        let mut u = w * us;
        if self.scene != Scene::SoftTissue {
            // Clear of the joint and the effusion by 3 mm.
            let busy = (
                self.effusion_u.0.min(self.gap.0) - r - 3.0,
                self.effusion_u.1.max(self.gap.1) + r + 3.0,
            );
            let lo = if self.effusion_u.1 > self.effusion_u.0 || self.scene == Scene::Joint {
                busy
            } else {
                (f64::MAX, f64::MIN)
            };
            if u > lo.0 && u < lo.1 {
                u = if lo.0 > w - lo.1 {
                    lo.0 * 0.5
                } else {
                    (lo.1 + w) * 0.5
                };
            }
        }
        // Below the tendon (where it passes over the vessel) or the fascia.
        let mut above = self.fascia_bottom;
        let mut x = u - r - 0.5;
        while x <= u + r + 0.5 {
            if let Some((_, b)) = self.tendon_range(x) {
                above = above.max(b);
            }
            x += 0.05;
        }
        let top = above + r + 0.8;
        let bottom = if self.scene == Scene::SoftTissue {
            depth_mm - r - 3.0
        } else {
            self.bone_base[0].min(self.bone_base[1])
                - self.bone_wave.0
                - self.cartilage_mm
                - self.effusion_height
                - r
                - 1.0
        };
        (bottom > top).then_some((u, top + ds * (bottom - top), r))
    }

    /// Local angle of the tendon's fibres to the probe face (rad; positive: deeper with u).
    fn tendon_angle(&self, u: f64) -> f64 {
        let x = (u - self.bend_c) / self.bend_half;
        let bump = if x.abs() < 1.0 {
            0.5 * (1.0 + (PI * x).cos())
        } else {
            0.0
        };
        self.tilt + self.bend * bump
    }

    fn tendon_top_at(&self, u: f64) -> f64 {
        let t = ((u + TENDON_MARGIN) / TENDON_STEP_MM).max(0.0);
        let i = (t as usize).min(self.tendon_top.len() - 2);
        let f = (t - i as f64).min(1.0);
        self.tendon_top[i] * (1.0 - f) + self.tendon_top[i + 1] * f
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

    /// Share of the specular bone echo that returns to the probe: a rough mirror, dimmer where
    /// the surface is steep (the rounded bone ends).
    fn bone_reflectivity(&self, u: f64) -> f64 {
        let h = 0.02;
        let slope = (self.bone_depth(u + h) - self.bone_depth(u - h)) / (2.0 * h);
        let cos = 1.0 / (1.0 + slope * slope).sqrt();
        0.03 + 0.97 * cos.powf(self.bone_roughness_exp)
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
        let top = self.tendon_top_at(u);
        Some((top, top + self.tendon_thick))
    }

    /// Echogenicity, attenuation, label, specular flag and scatterer density at (u, d).
    fn tissue(&self, u: f64, d: f64) -> Tissue {
        let nominal = TISSUE_ATTEN_DB_CM_MHZ;
        if let Some((vu, vd, vr)) = self.vessel {
            let r = ((u - vu).powi(2) + (d - vd).powi(2)).sqrt();
            if r < vr {
                return Tissue::diffuse(echo::FLUID, 0.02, Label::Vessel);
            }
            if r < vr + 0.15 {
                return Tissue::diffuse(echo::VESSEL_WALL, nominal, Label::Vessel);
            }
        }
        if let Some(PlacedNerve {
            centre: (nu, nd),
            half: (ha, hb),
            draw: n,
        }) = &self.nerve
        {
            let (x, y) = ((u - nu) / ha, (d - nd) / hb);
            let r = x.hypot(y);
            if r < 1.0 {
                // The rim (epineurium) in mm along the nearer axis.
                let rim = n.rim_mm / hb.min(*ha);
                let in_fascicle = r < 1.0 - rim
                    && n.fascicles
                        .iter()
                        .any(|&(fx, fy, fr)| (x - fx).hypot(y - fy) < fr);
                let echo = if in_fascicle {
                    echo::FASCICLE
                } else {
                    echo::EPINEURIUM
                };
                return Tissue::diffuse(echo, TISSUE_ATTEN_DB_CM_MHZ, Label::Nerve);
            }
        }
        if self.scene != Scene::SoftTissue && self.has_bone_at(u) {
            let bd = self.bone_depth(u);
            if d >= bd - BONE_BAND_ABOVE && d < bd + BONE_BAND_BELOW {
                // The interface (depth bd) reflects specularly: a mirror layer SPECULAR_MM thick
                // centred on it, so that after the pulse's blur the echo peaks on the interface,
                // as in a pulse-echo simulation (until the twelfth session the layer lay under
                // the interface and the echo peaked about a pixel deep). Above it is
                // cartilage, below it cortical bone that the beam barely enters.
                let specular = (d - bd).abs() < SPECULAR_MM / 2.0;
                if d < bd && !specular {
                    return Tissue::diffuse(echo::CARTILAGE, 0.3, Label::Bone);
                }
                return Tissue {
                    echo: if specular {
                        echo::BONE * self.bone_reflectivity(u)
                    } else {
                        echo::BONE * 0.05
                    },
                    atten: 40.0,
                    label: Label::Bone.code(),
                    specular,
                    density: 1.0,
                };
            }
            if d >= bd + BONE_BAND_BELOW {
                return Tissue::diffuse(echo::MUSCLE, 40.0, Label::Shadow);
            }
        }
        if self.scene == Scene::Joint && u >= self.gap.0 && u <= self.gap.1 {
            let floor = self.effusion_base(u);
            if d >= floor && d < floor + self.cartilage_mm + self.recess_depth {
                return Tissue::diffuse(echo::FLUID * 4.0, 0.05, Label::Joint);
            }
        }
        if let Some(top) = self.effusion_top(u) {
            if d >= top && d < self.effusion_base(u) {
                return Tissue::diffuse(echo::FLUID, 0.02, Label::Joint);
            }
        }
        if self.scene != Scene::SoftTissue && self.has_bone_at(u) {
            let bd = self.bone_depth(u);
            let top = bd - self.cartilage_mm;
            if d >= top {
                // Hypoechoic hyaline cartilage under a thin bright chondrosynovial interface.
                let e = if d < top + 0.1 {
                    echo::CARTILAGE_SURFACE
                } else {
                    echo::CARTILAGE
                };
                return Tissue::diffuse(e, 0.3, Label::Background);
            }
        }
        if let Some((t0, t1)) = self.tendon_range(u) {
            if d >= t0 && d < t1 {
                // Fibrils run along the tendon: bright lines of varying strength across it,
                // each modulated along its length; backscatter falls with the tilt.
                let theta = self.tendon_angle(u);
                let across = (d - t0) * theta.cos();
                let k = (across / self.fibre_period) as usize % self.fibrils.len();
                let (amp, along_period, phase) = self.fibrils[k];
                let profile = (0.5 + 0.5 * (2.0 * PI * across / self.fibre_period).cos()).powi(2);
                let along = 1.0 + 0.3 * (2.0 * PI * u / along_period + phase).sin();
                let m = 0.3 + 2.0 * amp * profile * along;
                let aniso =
                    self.aniso_floor + (1.0 - self.aniso_floor) * theta.cos().powf(self.aniso_n);
                // Where the tendon ends in the image it blends into muscle over 2 mm (a
                // myotendinous junction), not as a cut.
                let end = (u - self.tendon_u.0).min(self.tendon_u.1 - u) / 2.0;
                let w = end.clamp(0.0, 1.0);
                let w = w * w * (3.0 - 2.0 * w);
                let e = echo::TENDON * m * aniso * w + echo::MUSCLE * (1.0 - w);
                // The crest of each fibril bundle (endotenon) reflects like a thin mirror: the
                // continuous parallel lines of a tendon scanned along its fibres.
                return Tissue {
                    specular: profile > 0.75 && w > 0.5,
                    ..Tissue::diffuse(e, 0.9, Label::Tendon)
                };
            }
        }
        if d < self.entry_mm {
            // The epidermis entry echo: a mirror-like line.
            return Tissue {
                specular: true,
                ..Tissue::diffuse(echo::ENTRY, nominal, Label::Background)
            };
        }
        if d < self.skin_mm {
            return Tissue::diffuse(echo::DERMIS, nominal, Label::Background);
        }
        if d < self.skin_mm + self.fat_mm {
            for &(d0, slope, thick, u0, u1) in &self.septa {
                if u >= u0 && u <= u1 && (d - (d0 + slope * u)).abs() < thick / 2.0 {
                    return Tissue::diffuse(echo::SEPTUM, nominal, Label::Background);
                }
            }
            return Tissue {
                density: self.fat_density,
                ..Tissue::diffuse(echo::FAT, 0.6, Label::Background)
            };
        }
        if d < self.fascia_bottom {
            return Tissue::diffuse(echo::FASCIA, nominal, Label::Background);
        }
        let mut belly = 0;
        if let Some((d0, slope, thick)) = self.inter_fascia {
            let line = d0 + slope * u;
            if (d - line).abs() < thick / 2.0 {
                return Tissue::diffuse(echo::FASCIA * 0.6, nominal, Label::Background);
            }
            if d > line {
                belly = 1;
            }
        }
        // Muscle with perimysium striations along its fibres (pennation angle per belly).
        let (angle, spacing, phase, amp, sharp) = self.muscles[belly];
        let q = d * angle.cos() - u * angle.sin() + 0.15 * (2.0 * PI * u / 6.0 + phase).sin();
        let stria = 1.0 + amp * (2.0 * PI * q / spacing + phase).sin().max(0.0).powf(sharp);
        let mut density = 1.0;
        for &(su, sd, ru, rd, rho) in &self.sparse {
            if ((u - su) / ru).powi(2) + ((d - sd) / rd).powi(2) < 1.0 {
                density = rho;
            }
        }
        Tissue {
            density,
            ..Tissue::diffuse(echo::MUSCLE * stria, nominal, Label::Background)
        }
    }

    /// Partial-shadow loss at (u, d), dB.
    fn edge_shadow_db(&self, u: f64, d: f64) -> f64 {
        self.edges
            .iter()
            .filter(|e| d > e.from_depth)
            .map(|e| e.db * (-((u - e.u) / e.half_width).powi(2)).exp())
            .sum()
    }

    /// Half of the target structure's smaller dimension (at least 1 mm).
    fn target_tolerance(&self, kind: TargetKind) -> f64 {
        let half = match kind {
            TargetKind::JointSpace => {
                (self.gap.1 - self.gap.0).min(self.cartilage_mm + self.recess_depth) / 2.0
            }
            TargetKind::Effusion => {
                (self.effusion_u.1 - self.effusion_u.0).min(self.effusion_height) / 2.0
            }
            _ => 1.0,
        };
        half.max(1.0)
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

/// The operator's settings of one case.
#[derive(Debug, Clone, Copy)]
struct Scanner {
    frequency_mhz: f64,
    mm_per_px: f64,
    dynamic_range_db: f64,
    gain_db: f64,
    tgc_error: f64,
    /// Thermal noise at the face before the TGC, dB re muscle echo.
    noise_face_db: f64,
    curved_radius_mm: f64,
}

impl Scanner {
    /// The TGC's miss at depth `d` mm: positive where the image is too bright, dB.
    fn tgc_error_db(&self, d: f64) -> f64 {
        (2.0 * self.tgc_error * self.frequency_mhz * d / 10.0)
            .clamp(-TGC_ERROR_CAP_DB, TGC_ERROR_CAP_DB)
    }
    /// Power gain applied to echoes from depth `d` beyond the nominal TGC.
    fn display_gain(&self, d: f64) -> f64 {
        10f64.powf((self.gain_db + self.tgc_error_db(d)) / 10.0)
    }
    /// Thermal noise power at depth `d` after the TGC and gain, relative to muscle echo.
    fn noise_power(&self, d: f64) -> f64 {
        let tgc = 2.0 * TISSUE_ATTEN_DB_CM_MHZ * self.frequency_mhz * d / 10.0;
        10f64.powf((self.noise_face_db + tgc + self.gain_db + self.tgc_error_db(d)) / 10.0)
    }
    /// Log compression of a power (relative to muscle echo) to a grey level.
    fn grey(&self, p: f64) -> f64 {
        let dr = self.dynamic_range_db;
        let db = 10.0 * p.max(1e-30).log10() - MUSCLE_BELOW_TOP * dr;
        (255.0 * (db + dr) / dr).clamp(0.0, 255.0)
    }
}

fn check(ok: bool, name: &'static str, reason: impl FnOnce() -> String) -> super::Result<()> {
    if ok {
        Ok(())
    } else {
        Err(crate::sim::SimError::InvalidParameter {
            name,
            reason: reason(),
        })
    }
}

/// Generates one case.
pub fn generate(name: &str, params: &PhantomParams) -> super::Result<Phantom> {
    let p = params;
    check(
        (32..=4096).contains(&p.width) && (32..=4096).contains(&p.height),
        "size",
        || format!("{}x{} (32..4096 each)", p.width, p.height),
    )?;
    check((1..=1000).contains(&p.frames), "frames", || {
        format!("{} (1..1000)", p.frames)
    })?;
    if let Some(s) = p.mm_per_px {
        check(s > 0.01 && s < 1.0, "mm_per_px", || {
            format!("{s} (0.01..1)")
        })?;
    }
    if let Some(f) = p.frequency_mhz {
        check((2.0..=20.0).contains(&f), "frequency_mhz", || {
            format!("{f} (2..20)")
        })?;
    }
    if let Some(dr) = p.dynamic_range_db {
        check((20.0..=100.0).contains(&dr), "dynamic_range_db", || {
            format!("{dr} (20..100)")
        })?;
    }
    if let Some(g) = p.gain_db {
        check((-30.0..=30.0).contains(&g), "gain_db", || {
            format!("{g} (-30..30)")
        })?;
    }
    let mut rng = Rng::new(p.seed);
    // The operator's settings: all drawn, also those given, so that the rest stays the same.
    let dr = rng.range(DYNAMIC_RANGE_DB_RANGE.0, DYNAMIC_RANGE_DB_RANGE.1);
    let gain_db = rng.range(GAIN_DB_RANGE.0, GAIN_DB_RANGE.1);
    let tgc_error = rng.range(-TGC_ERROR_DB_CM_MHZ, TGC_ERROR_DB_CM_MHZ);
    let noise_face_db = rng.range(-100.0, -82.0);
    // Curved (curvilinear) arrays: face radius 30–60 mm.
    let curved_radius_mm = rng.range(30.0, 60.0);
    let depth_share = rng.range(0.4, 0.8);
    let freq_u = rng.unit();
    let mut draws = Draws::random(&mut rng);
    draws.nerve = nerve_draw(p.seed, draws.scene);
    let s = p.mm_per_px.unwrap_or_else(|| {
        let depth = (draws.nominal_depth() / depth_share).clamp(DEPTH_RANGE_MM.0, DEPTH_RANGE_MM.1);
        (depth / p.height as f64).clamp(MM_PER_PX_RANGE.0, MM_PER_PX_RANGE.1)
    });
    let depth_mm = p.height as f64 * s;
    let frequency_mhz = p.frequency_mhz.unwrap_or(match p.geometry {
        Geometry::Linear => {
            // Deeper images need lower frequencies: at most 60 / depth in cm.
            let (lo, hi) = LINEAR_FREQUENCY_MHZ;
            let top = (600.0 / depth_mm).clamp(lo, hi);
            lo + (top - lo) * freq_u
        }
        Geometry::Curved => {
            let (lo, hi) = CURVED_FREQUENCY_MHZ;
            lo + (hi - lo) * freq_u
        }
    });
    let scanner = Scanner {
        frequency_mhz,
        mm_per_px: s,
        dynamic_range_db: p.dynamic_range_db.unwrap_or(dr),
        gain_db: p.gain_db.unwrap_or(gain_db),
        tgc_error,
        noise_face_db,
        curved_radius_mm,
    };
    // Beam space: for a curved array, columns are angles and rows range; same pixel count.
    let motion = p.motion_px_per_frame * (p.frames - 1);
    let conv = ScanConverter::new(p.width, p.height, s, curved_radius_mm);
    let beam_cols = match p.geometry {
        Geometry::Linear => p.width,
        Geometry::Curved => conv.beam_cols,
    };
    let (bw, bh) = (beam_cols + motion, p.height);
    let anatomy = Anatomy::build(&draws, beam_cols as f64 * s, bw as f64 * s, depth_mm);
    let u_of = |x: usize| x as f64 * s;
    let d_of = |y: usize| y as f64 * s;

    // Tissue properties on the beam-space canvas.
    let mut echo_map = Array2::<f64>::zeros((bh, bw));
    let mut atten = Array2::<f64>::zeros((bh, bw));
    let mut labels = Array2::<u8>::zeros((bh, bw));
    let mut specular = Array2::<bool>::from_elem((bh, bw), false);
    let mut density = Array2::<f64>::ones((bh, bw));
    for y in 0..bh {
        for x in 0..bw {
            let t = anatomy.tissue(u_of(x), d_of(y));
            echo_map[[y, x]] = t.echo;
            atten[[y, x]] = t.atten;
            labels[[y, x]] = t.label;
            specular[[y, x]] = t.specular;
            density[[y, x]] = t.density;
        }
    }
    // Two-way attenuation down each column with the TGC's nominal compensation, and the
    // partial shadows below edges.
    let f = frequency_mhz;
    let mut gain = Array2::<f64>::zeros((bh, bw));
    let step_cm = s / 10.0;
    for x in 0..bw {
        let u = u_of(x);
        let near = anatomy
            .edges
            .iter()
            .any(|e| (u - e.u).abs() < 4.0 * e.half_width);
        let mut db = 0.0;
        for y in 0..bh {
            // An echo from this pixel has crossed the pixels above and, on average, half of
            // this one (so an attenuator's own echo does not depend on the pixel size).
            let step_db = 2.0 * (atten[[y, x]] - TISSUE_ATTEN_DB_CM_MHZ) * f * step_cm;
            // A specular interface reflects before the medium below it attenuates anything.
            let own = if specular[[y, x]] { 0.0 } else { 0.5 * step_db };
            let edge = if near {
                anatomy.edge_shadow_db(u, d_of(y))
            } else {
                0.0
            };
            gain[[y, x]] = 10f64.powf(-(db + own + edge) / 10.0).min(1e3);
            db += step_db;
        }
    }
    // What fills the shadow: reverberations of the bone echo, comet tails, clutter haze.
    let mut coherent = Array2::<f64>::zeros((bh, bw));
    let mut haze = Array2::<f64>::zeros((bh, bw));
    if anatomy.scene != Scene::SoftTissue {
        fill_shadows(
            &anatomy,
            s,
            &echo_map,
            &gain,
            &specular,
            &mut coherent,
            &mut haze,
        );
    }
    // Scatterers: complex Gaussian, amplitude √(echo × gain), sparse where the density is
    // below 1; specular interfaces and reverberations: coherent phase.
    let wavelength_mm = SOUND_SPEED_MM_PER_US / f;
    let sigma_t_us = 2.0 * (2.0 * 2f64.ln()).sqrt() / (2.0 * PI * FRACTIONAL_BANDWIDTH * f);
    let sigma_z_mm = SOUND_SPEED_MM_PER_US * sigma_t_us / 2.0;
    let sigma_x_mm = wavelength_mm * F_NUMBER / (2.0 * (2.0 * 2f64.ln()).sqrt());
    let (sy, sx) = ((sigma_z_mm / s).max(0.5), (sigma_x_mm / s).max(0.5));
    let pad = ((4.0 * sy.max(sx)).ceil() as usize + 2).max(16);
    let (ph, pw) = (bh + 2 * pad, bw + 2 * pad);
    let mut iq = Array2::<Complex<f64>>::zeros((ph, pw));
    let mut mean_power = Array2::<Complex<f64>>::zeros((ph, pw));
    // A coherent line adds up across the lateral beam (a power gain of 2√π·σx pixels) where
    // diffuse scatterers do not: scale it so that a mirror's echo does not depend on the beam
    // width in pixels (calibrated at the nominal 7.5 MHz and 0.08 mm/px).
    let nominal_sx =
        (SOUND_SPEED_MM_PER_US / 7.5) * F_NUMBER / (2.0 * (2.0 * 2f64.ln()).sqrt()) / 0.08;
    let coherent_scale = nominal_sx / sx;
    let mirror = |rng: &mut Rng, power: f64| {
        // A mirror-like interface: mostly coherent, with slight roughness.
        let amp = (power * coherent_scale).sqrt();
        Complex::new(amp * (0.7 + 0.3 * rng.normal()), amp * 0.3 * rng.normal())
    };
    for y in 0..bh {
        let display = scanner.display_gain(d_of(y));
        for x in 0..bw {
            let power = echo_map[[y, x]] * gain[[y, x]];
            let rho = density[[y, x]];
            let mut z = if specular[[y, x]] {
                mirror(&mut rng, power)
            } else if rho < 1.0 {
                if rng.unit() < rho {
                    Complex::new(rng.normal(), rng.normal()) * (power / rho / 2.0).sqrt()
                } else {
                    Complex::new(0.0, 0.0)
                }
            } else {
                Complex::new(rng.normal(), rng.normal()) * (power / 2.0).sqrt()
            };
            let (c, hz) = (coherent[[y, x]], haze[[y, x]]);
            if c > 0.0 {
                z += mirror(&mut rng, c);
            }
            if hz > 0.0 {
                z += Complex::new(rng.normal(), rng.normal()) * (hz / 2.0).sqrt();
            }
            iq[[y + pad, x + pad]] = z * display.sqrt();
            let coherent_power = if specular[[y, x]] { power } else { 0.0 } + c;
            let diffuse_power = if specular[[y, x]] { 0.0 } else { power } + hz;
            mean_power[[y + pad, x + pad]] = Complex::new(
                (diffuse_power + coherent_power * coherent_scale) * display,
                0.0,
            );
        }
    }
    // The PSF: axial Gaussian pulse from the frequency and bandwidth, lateral beam λ·F#.
    convolve_gaussian(&mut iq, sy, sx, false);
    convolve_gaussian(&mut mean_power, sy, sx, true);

    // Frames: windows of the canvas; curved arrays scan-converted.
    let mut frames = Vec::with_capacity(p.frames);
    let mut cleans = Vec::with_capacity(p.frames);
    let mut label_frames = Vec::with_capacity(p.frames);
    let noise: Vec<f64> = (0..bh).map(|y| scanner.noise_power(d_of(y))).collect();
    let speckle_bias = 10f64.powf(LOG_SPECKLE_BIAS_DB / 10.0);
    let mut beam_frames = Vec::new();
    for k in 0..p.frames {
        let off = k * p.motion_px_per_frame;
        let mut img = Array2::<f64>::zeros((bh, beam_cols));
        let mut clean = Array2::<f64>::zeros((bh, beam_cols));
        let mut lab = Array2::<u8>::zeros((bh, beam_cols));
        for y in 0..bh {
            let noise_amp = (noise[y] / 2.0).sqrt();
            for x in 0..beam_cols {
                let z = iq[[y + pad, x + off + pad]]
                    + Complex::new(rng.normal(), rng.normal()) * noise_amp;
                img[[y, x]] = scanner.grey(z.norm_sqr());
                let mp = mean_power[[y + pad, x + off + pad]].re.max(0.0);
                clean[[y, x]] = scanner.grey(mp * speckle_bias + noise[y]);
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
    let truth = truth_of(name, p, &scanner, &anatomy, &conv, beam_cols, &beam_frames);
    Ok(Phantom {
        frames,
        clean: cleans,
        labels: label_frames,
        truth,
    })
}

/// Adds to the shadow below each bone column what a scanner shows there: reverberations
/// (copies of the bone echo at multiples of its depth, each `reverb_db` weaker), comet tails
/// (ring-down: closely spaced decaying rings below a point of the cortex) as coherent power,
/// and a clutter haze 25–40 dB below the brightest tissue echo of the column above as
/// diffuse power. Powers are after attenuation and nominal TGC, like `echo × gain`.
fn fill_shadows(
    a: &Anatomy,
    s: f64,
    echo_map: &Array2<f64>,
    gain: &Array2<f64>,
    specular: &Array2<bool>,
    coherent: &mut Array2<f64>,
    haze: &mut Array2<f64>,
) {
    let (bh, bw) = echo_map.dim();
    let depth_mm = bh as f64 * s;
    let row = |d: f64| (d / s).ceil().max(0.0) as usize;
    // The brightest tissue echo above the bone (the largest mean echo power of the column's
    // diffuse scatterers between the skin and the cartilage: fascia, tendon fibrils), per
    // column; none where there is no bone. Clutter is such echoes leaking into the shadow
    // through side lobes and multiple paths.
    let mut above = vec![f64::NAN; bw];
    for (x, slot) in above.iter_mut().enumerate() {
        let u = x as f64 * s;
        if !a.has_bone_at(u) {
            continue;
        }
        let bd = a.bone_depth(u);
        let (y0, y1) = (row(a.skin_mm), row(bd - BONE_BAND_ABOVE).min(bh));
        let v: Vec<f64> = (y0..y1)
            .filter(|&y| !specular[[y, x]])
            .map(|y| echo_map[[y, x]] * gain[[y, x]])
            .collect();
        *slot = v.into_iter().fold(1.0, f64::max);
    }
    // Smooth laterally over ±1 mm: the haze does not follow single columns.
    let r = (1.0 / s).round() as usize;
    let smooth: Vec<f64> = (0..bw)
        .map(|x| {
            let (lo, hi) = (x.saturating_sub(r), (x + r + 1).min(bw));
            let v: Vec<f64> = above[lo..hi]
                .iter()
                .copied()
                .filter(|v| v.is_finite())
                .collect();
            if v.is_empty() {
                f64::NAN
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            }
        })
        .collect();
    let (c_db, c_var, c_period, c_phase, c_slope) = a.clutter;
    for x in 0..bw {
        let u = x as f64 * s;
        if !a.has_bone_at(u) || !smooth[x].is_finite() {
            continue;
        }
        let bd = a.bone_depth(u);
        let ys = row(bd);
        if ys >= bh {
            continue;
        }
        let bone_echo = echo_map[[ys, x]] * gain[[ys, x]];
        // Reverberations: the echo travels probe → bone → probe → bone → probe.
        for k in 2..8 {
            let dk = k as f64 * bd;
            if dk >= depth_mm {
                break;
            }
            let level = bone_echo * 10f64.powf(-(k - 1) as f64 * a.reverb_db / 10.0);
            let thick = SPECULAR_MM * (1.0 + 0.5 * (k - 1) as f64);
            for y in row(dk)..row(dk + thick).max(row(dk) + 1).min(bh) {
                coherent[[y, x]] += level;
            }
        }
        // Comet tails.
        for c in &a.comets {
            if (u - c.u).abs() > 3.0 * c.half_width {
                continue;
            }
            for y in row(bd + SPECULAR_MM)..row(bd + c.length).min(bh) {
                let t = y as f64 * s - bd;
                let hw = c.half_width * (1.0 - 0.7 * t / c.length);
                let taper = (-((u - c.u) / hw).powi(2)).exp();
                let ring = (PI * t / c.spacing).cos().powi(4);
                coherent[[y, x]] +=
                    bone_echo * 10f64.powf(-(c.level_db + c.decay_db_mm * t) / 10.0) * taper * ring;
            }
        }
        // Clutter haze.
        let lateral = c_var * (2.0 * PI * u / c_period + c_phase).sin();
        for y in row(bd + BONE_BAND_BELOW).min(bh)..bh {
            let below = y as f64 * s - bd;
            haze[[y, x]] += smooth[x] * 10f64.powf(-(c_db + lateral + c_slope * below) / 10.0);
        }
    }
}

/// Bone polylines, target, forbidden structures and settings of a generated case.
fn truth_of(
    name: &str,
    p: &PhantomParams,
    scanner: &Scanner,
    anatomy: &Anatomy,
    conv: &ScanConverter,
    beam_cols: usize,
    beam_frames: &[usize],
) -> Truth {
    let s = scanner.mm_per_px;
    let reference_px = [p.width as f64 / 2.0, 0.0];
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
                .unwrap_or(anatomy.fascia_bottom + 1.0);
            (TargetKind::Peritendinous, (u, top - 0.5))
        }
    };
    let u_of = |x: usize| x as f64 * s;
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
    if let Some(PlacedNerve {
        centre: (nu, nd),
        half: (ha, hb),
        ..
    }) = &anatomy.nerve
    {
        let c = to_px(*nu, *nd, 0);
        forbidden.push(Forbidden {
            kind: "nerve",
            points_px: vec![c],
            points_mm: vec![to_mm(c)],
            radius_mm: Some(ha.max(*hb)),
        });
    }
    let (region, curved) = match p.geometry {
        Geometry::Linear => (Rect::full(p.width, p.height), None),
        Geometry::Curved => {
            let (ax, ay) = conv.apex();
            (
                conv.bounds(),
                Some(CurvedTruth {
                    apex_px: [ax, ay],
                    radius_mm: scanner.curved_radius_mm,
                    half_angle_deg: (conv.beam_cols as f64 / 2.0 / conv.radius_px).to_degrees(),
                }),
            )
        }
    };
    Truth {
        name: name.to_string(),
        seed: p.seed,
        source: "phantom",
        geometry: p.geometry,
        size_px: [p.width, p.height],
        spacing_mm: [s, s],
        reference_px,
        region,
        curved,
        scene: match anatomy.scene {
            Scene::Joint => "joint",
            Scene::Bone => "bone",
            Scene::SoftTissue => "soft_tissue",
        },
        target_kind,
        target_tolerance_mm: anatomy.target_tolerance(target_kind),
        frequency_mhz: scanner.frequency_mhz,
        depth_mm: p.height as f64 * s,
        dynamic_range_db: scanner.dynamic_range_db,
        gain_db: scanner.gain_db,
        tgc_error_db_cm_mhz: scanner.tgc_error,
        forbidden,
        frames: frame_truths,
    }
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

/// Radius of the curved array's face in mm when a truth does not say (older files).
const CURVED_RADIUS_MM: f64 = 40.0;

impl ScanConverter {
    fn new(width: usize, height: usize, s: f64, radius_mm: f64) -> Self {
        let radius_px = radius_mm / s;
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
        mm_per_px: Some((case.truth.spacing_mm[0], case.truth.spacing_mm[1])),
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
    // As scanners do, the ultrasound region is a rectangle (for a curved array the fan's
    // bounding rectangle, `truth.region`): a reader has to find the fan inside it itself.
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
/// (with the reference pixel), and the imaging region (a fan mask for curved arrays: the
/// evaluations in memory skip finding the fan; a written case declares only its bounding
/// rectangle).
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
            let radius = t.curved.map_or(CURVED_RADIUS_MM, |c| c.radius_mm);
            let conv = ScanConverter::new(w, h, t.spacing_mm[0], radius);
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
