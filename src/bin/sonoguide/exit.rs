//! The one mapping from outcomes to exit codes: 0 all good, 1 some inputs failed (the others
//! were processed), 2 usage error (bad arguments, an output folder that cannot be created, an
//! address that cannot be listened on), 3 a server (DICOMweb) unreachable or refusing the
//! credentials.

use std::process::ExitCode;

use sonoguide::batch::BatchError;
use sonoguide::igtl::IgtlError;
use sonoguide::kernels::KernelError;

/// Exit code when some inputs failed.
pub const EXIT_INPUT_FAILED: u8 = 1;
/// Exit code for a usage error.
pub const EXIT_USAGE: u8 = 2;
/// Exit code when a server (DICOMweb) cannot be reached or refuses the credentials.
pub const EXIT_SERVER: u8 = 3;

/// Why a command stopped.
#[derive(Debug)]
pub enum Failure {
    /// The command was asked for something it cannot do (exit 2).
    Usage(String),
    /// The work failed (exit 1).
    Failed(String),
    /// A server could not be reached or refused the credentials (exit 3).
    Server(String),
    /// The command has already reported what failed; exit 1 without another message.
    Reported,
}

/// What every command returns.
pub type Outcome = Result<(), Failure>;

impl From<sonoguide::Error> for Failure {
    fn from(e: sonoguide::Error) -> Failure {
        match &e {
            sonoguide::Error::Kernel(KernelError::InvalidParameter { .. })
            | sonoguide::Error::Plan(_)
            | sonoguide::Error::Batch(BatchError::OutputFolder { .. })
            | sonoguide::Error::Igtl(IgtlError::Bind { .. } | IgtlError::Config { .. }) => {
                Failure::Usage(e.to_string())
            }
            _ => Failure::Failed(e.to_string()),
        }
    }
}

impl From<sonoguide::sim::SimError> for Failure {
    fn from(e: sonoguide::sim::SimError) -> Failure {
        match e {
            sonoguide::sim::SimError::Library(e) => e.into(),
            e => Failure::Failed(e.to_string()),
        }
    }
}

impl From<sonoguide::dicom::DicomError> for Failure {
    fn from(e: sonoguide::dicom::DicomError) -> Failure {
        Failure::Failed(e.to_string())
    }
}

/// Prints the failure, if any, and gives the exit code.
pub fn exit_code(outcome: Outcome) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(m)) => {
            eprintln!("error: {m}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(Failure::Failed(m)) => {
            eprintln!("error: {m}");
            ExitCode::from(EXIT_INPUT_FAILED)
        }
        Err(Failure::Server(m)) => {
            eprintln!("error: {m}");
            ExitCode::from(EXIT_SERVER)
        }
        Err(Failure::Reported) => ExitCode::from(EXIT_INPUT_FAILED),
    }
}

/// Creates the output folder (a usage error when it cannot be made).
pub fn make_out_dir(out: &std::path::Path) -> Outcome {
    std::fs::create_dir_all(out).map_err(|e| {
        Failure::Usage(format!(
            "cannot create output folder {}: {e}",
            out.display()
        ))
    })
}

/// Prints `v` as pretty JSON on stdout.
pub fn print_json<T: serde::Serialize>(v: &T) -> Outcome {
    let s = serde_json::to_string_pretty(v).map_err(|e| Failure::Failed(e.to_string()))?;
    println!("{s}");
    Ok(())
}
