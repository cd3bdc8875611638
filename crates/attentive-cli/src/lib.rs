//! The parts of the `attentive` command that read untrusted files, as a library so that tests
//! and the fuzz targets (`fuzz/`) reach them as the command does.

pub mod error;
pub mod npy;
