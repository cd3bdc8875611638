//! The one error type of the command line.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum CliError {
    /// A `.npy` file that is missing, malformed, or of the wrong type.
    #[error("{path}: {reason}")]
    Npy { path: String, reason: String },
    /// An input of the right type but the wrong rank or shape.
    #[error("{what}: {reason}")]
    Input { what: String, reason: String },
    /// The engine refused the inputs.
    #[error(transparent)]
    Attention(#[from] attentive::AttnError),
    /// Ring attention failed on this rank or learned that another rank did.
    #[error(transparent)]
    Ring(#[from] attentive_dist::DistError),
}
