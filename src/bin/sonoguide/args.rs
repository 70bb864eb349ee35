//! Argument types shared by several commands.

use clap::ValueEnum;
use sonoguide::{Backend, Filter};

/// Where the kernels run.
#[derive(Clone, Copy, ValueEnum)]
pub enum BackendArg {
    /// A hardware GPU when there is one, else the CPU.
    Auto,
    /// Any GPU adapter (software ones too); an error when there is none.
    Gpu,
    /// The CPU.
    Cpu,
}

impl From<BackendArg> for Backend {
    fn from(b: BackendArg) -> Backend {
        match b {
            BackendArg::Auto => Backend::Auto,
            BackendArg::Gpu => Backend::Gpu,
            BackendArg::Cpu => Backend::Cpu,
        }
    }
}

/// The backend option of every command that runs kernels.
#[derive(clap::Args, Clone, Copy)]
pub struct BackendOpt {
    /// Where the kernels run.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    pub backend: BackendArg,
}

impl BackendOpt {
    /// The library's backend.
    pub fn get(self) -> Backend {
        self.backend.into()
    }
}

/// How the segmenter decides.
#[derive(Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum SegmenterArg {
    /// The pixel classifier (models/pixel_mlp.json) and the bone surface from its output.
    Learned,
    /// The hand-made rules of the first version (kept for comparison).
    Rules,
}

/// The segmenter option of the commands that segment.
#[derive(clap::Args, Clone, Copy)]
pub struct SegmenterOpt {
    /// How the segmenter decides.
    #[arg(long, value_enum, default_value_t = SegmenterArg::Learned)]
    pub segmenter: SegmenterArg,
}

impl SegmenterOpt {
    /// The segmenter's settings.
    pub fn params(self) -> sonoguide::segment::SegmentParams {
        let mut p = sonoguide::segment::SegmentParams::default();
        p.learned = self.segmenter == SegmenterArg::Learned;
        p
    }
}

/// The despeckling filters by name.
pub const FILTER_CHOICES: [&str; 5] = ["srad", "obnlm", "lee", "frost", "median"];

/// Filter choice and options shared by the commands that despeckle.
#[derive(clap::Args, Clone)]
pub struct FilterArgs {
    /// Speckle filter.
    #[arg(long, default_value = "srad", value_parser = FILTER_CHOICES)]
    filter: String,
    /// SRAD: iterations.
    #[arg(long)]
    iterations: Option<u32>,
    /// SRAD: time step (0..1].
    #[arg(long)]
    lambda: Option<f32>,
    /// OBNLM: search window (odd).
    #[arg(long)]
    search: Option<u32>,
    /// OBNLM: patch (odd).
    #[arg(long)]
    patch: Option<u32>,
    /// OBNLM: smoothing h.
    #[arg(long)]
    h: Option<f32>,
    /// Lee, Frost: window (odd).
    #[arg(long)]
    window: Option<u32>,
    /// Lee: speckle coefficient of variation.
    #[arg(long)]
    noise_cv: Option<f32>,
    /// Frost: damping.
    #[arg(long)]
    damping: Option<f32>,
    /// Median: size (3 or 5).
    #[arg(long = "median-size")]
    median_size: Option<u32>,
}

impl FilterArgs {
    /// The filter with the given options over its defaults.
    pub fn filter(&self) -> sonoguide::Result<Filter> {
        use sonoguide::despeckle::defaults as d;
        use sonoguide::kernels::{frost, lee, median, obnlm, srad};
        Ok(match self.filter.as_str() {
            "srad" => Filter::Srad(srad::Srad::new(
                self.lambda.unwrap_or(d::SRAD_LAMBDA),
                self.iterations.unwrap_or(d::SRAD_ITERATIONS),
            )?),
            "obnlm" => Filter::Obnlm(obnlm::Params::new(
                self.search.unwrap_or(d::OBNLM_SEARCH),
                self.patch.unwrap_or(d::OBNLM_PATCH),
                self.h.unwrap_or(d::OBNLM_H),
            )?),
            "lee" => Filter::Lee(lee::Params::new(
                self.window.unwrap_or(d::LEE_WINDOW),
                self.noise_cv.unwrap_or(d::LEE_NOISE_CV),
            )?),
            "frost" => Filter::Frost(frost::Params::new(
                self.window.unwrap_or(d::FROST_WINDOW),
                self.damping.unwrap_or(d::FROST_DAMPING),
            )?),
            "median" => Filter::Median(median::Params::new(
                self.median_size.unwrap_or(d::MEDIAN_SIZE),
            )?),
            other => Filter::default_for(other)?,
        })
    }
}

/// Probe geometry of generated phantoms.
#[derive(Clone, Copy, ValueEnum)]
pub enum GeometryArg {
    /// Linear array.
    Linear,
    /// Curved array (fan).
    Curved,
}

impl From<GeometryArg> for sonoguide::sim::phantom::Geometry {
    fn from(g: GeometryArg) -> Self {
        match g {
            GeometryArg::Linear => sonoguide::sim::phantom::Geometry::Linear,
            GeometryArg::Curved => sonoguide::sim::phantom::Geometry::Curved,
        }
    }
}

/// Frames: N, A..B (B excluded) or A-B (B included); zero-based. Gives `[start, end)`.
pub fn parse_frames(s: &str) -> Result<(usize, usize), String> {
    let num = |t: &str| {
        t.trim()
            .parse::<usize>()
            .map_err(|_| format!("'{t}' is not a frame number"))
    };
    if let Some((a, b)) = s.split_once("..") {
        let (a, b) = (num(a)?, num(b)?);
        return if b > a {
            Ok((a, b))
        } else {
            Err(format!("empty range '{s}'"))
        };
    }
    if let Some((a, b)) = s.split_once('-') {
        let (a, b) = (num(a)?, num(b)?);
        return if b >= a {
            Ok((a, b + 1))
        } else {
            Err(format!("empty range '{s}'"))
        };
    }
    let n = num(s)?;
    Ok((n, n + 1))
}

/// A target X_MM,Y_MM with a finite lateral position and a finite depth ≥ 0.
pub fn parse_target(s: &str) -> Result<(f64, f64), String> {
    let (x, y) = s
        .split_once(',')
        .ok_or_else(|| format!("'{s}' is not X_MM,Y_MM"))?;
    let x: f64 = x.trim().parse().map_err(|_| format!("bad X in '{s}'"))?;
    let y: f64 = y.trim().parse().map_err(|_| format!("bad Y in '{s}'"))?;
    if !x.is_finite() || !y.is_finite() || y < 0.0 {
        return Err(format!("'{s}': the depth must be a finite number ≥ 0"));
    }
    Ok((x, y))
}

/// WIDTHxHEIGHT.
pub fn parse_size(s: &str) -> Result<(usize, usize), String> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("'{s}' is not WIDTHxHEIGHT"))?;
    let w = w
        .trim()
        .parse()
        .map_err(|_| format!("bad width in '{s}'"))?;
    let h = h
        .trim()
        .parse()
        .map_err(|_| format!("bad height in '{s}'"))?;
    Ok((w, h))
}

/// Opens the despeckler, printing why the backend differs from the one asked for.
pub fn open_despeckler(backend: Backend) -> sonoguide::Result<sonoguide::Despeckler> {
    let d = sonoguide::Despeckler::new(backend)?;
    if let Some(note) = d.note() {
        eprintln!("note: {note}");
    }
    Ok(d)
}
