//! The harness: synthetic phantoms with ground truth, quality measures, evaluations and
//! benchmarks. It uses the library like any caller would; nothing in the pipeline uses it.
//! Built with the `sim` feature (on by default; the command line's `phantom`, `eval-*` and
//! `bench` commands need it).

pub mod bench;
pub mod eval;
pub mod phantom;
pub mod quality;

/// Errors of the harness.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// A phantom, evaluation or bench setting is outside its valid range.
    #[error("invalid parameter {name}: {reason}")]
    InvalidParameter {
        /// The setting's name.
        name: &'static str,
        /// Why the value was refused.
        reason: String,
    },
    /// A bench's loopback connection to the OpenIGTLink server failed.
    #[error("bench connection to {peer}: {source}")]
    Connection {
        /// The server's address.
        peer: String,
        /// What the operating system said.
        source: std::io::Error,
    },
}
