//! The `phantom` command: synthetic cases with truth (DICOM, truth labels, clean map, truth
//! JSON), for the evaluations.

use std::path::PathBuf;

use sonoguide::sim::phantom;

use crate::args::parse_size;
use crate::exit::{make_out_dir, Failure, Outcome};
/// `phantom`'s arguments.
#[derive(clap::Args)]
pub struct PhantomArgs {
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Number of cases.
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Seed of the first case (case i uses seed + i). Tune on seeds 1–999, test on 50000 and
    /// above.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Frames per case (more than 1: a cine with the probe sliding sideways).
    #[arg(long, default_value_t = 1)]
    frames: usize,
    /// Probe geometry; `mixed` draws it per seed (about a third curved).
    #[arg(long, value_enum, default_value_t = ProbeArg::Linear)]
    geometry: ProbeArg,
    /// Image size, WIDTHxHEIGHT.
    #[arg(long, default_value = "480x360", value_parser = parse_size)]
    size: (usize, usize),
    /// Millimetres per pixel [default: per seed, the depth the anatomy needs, 0.06–0.15].
    #[arg(long)]
    mm_per_px: Option<f64>,
    /// Transmit frequency, MHz [default: per seed, 5–15 linear, 2–5 curved].
    #[arg(long)]
    frequency_mhz: Option<f64>,
    /// Log-compression dynamic range, dB [default: per seed, 40–70].
    #[arg(long)]
    dynamic_range_db: Option<f64>,
    /// Overall gain, dB [default: per seed, −6 to +6].
    #[arg(long, allow_negative_numbers = true)]
    gain_db: Option<f64>,
    /// Case name prefix.
    #[arg(long, default_value = "phantom")]
    prefix: String,
}

/// Probe geometry of written phantoms.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ProbeArg {
    /// Linear array.
    Linear,
    /// Curved array (fan).
    Curved,
    /// Linear or curved, drawn per seed.
    Mixed,
}

/// `sonoguide phantom`.
pub fn phantom(args: PhantomArgs) -> Outcome {
    let mut params = phantom::PhantomParams::default();
    params.width = args.size.0;
    params.height = args.size.1;
    params.mm_per_px = args.mm_per_px;
    params.frames = args.frames;
    params.frequency_mhz = args.frequency_mhz;
    params.dynamic_range_db = args.dynamic_range_db;
    params.gain_db = args.gain_db;
    make_out_dir(&args.out)?;
    let mut failed = false;
    for i in 0..args.count {
        let mut p = params.clone();
        p.seed = args.seed + i as u64;
        p.geometry = match args.geometry {
            ProbeArg::Linear => phantom::Geometry::Linear,
            ProbeArg::Curved => phantom::Geometry::Curved,
            ProbeArg::Mixed => phantom::Geometry::for_seed(p.seed),
        };
        let name = format!("{}_{:04}", args.prefix, p.seed);
        match phantom::write_case(&args.out, &name, &p) {
            Ok(truth) => eprintln!(
                "{}: {} scene, target {}, {} frame(s), {:?}, {:.3} mm/px, {:.1} MHz, {:.0} dB range, gain {:+.1} dB",
                args.out.join(format!("{name}.dcm")).display(),
                truth.scene,
                truth.target_kind,
                truth.frames.len(),
                truth.geometry,
                truth.spacing_mm[0],
                truth.frequency_mhz,
                truth.dynamic_range_db,
                truth.gain_db
            ),
            Err(e) => {
                eprintln!("error: {name}: {e}");
                failed = true;
            }
        }
    }
    if failed {
        Err(Failure::Reported)
    } else {
        Ok(())
    }
}
