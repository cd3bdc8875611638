//! Reading and writing NumPy `.npy` files (through the `npyz` crate), with errors that name the
//! file and what is wrong with it.

use crate::error::CliError;
use npyz::{DType, NpyFile, WriterBuilder};
use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::Path;

/// An array read from disk: its shape and its elements in row-major order.
pub struct Array<T> {
    pub shape: Vec<usize>,
    pub data: Vec<T>,
}

fn bad(path: &Path, reason: impl Into<String>) -> CliError {
    CliError::Npy {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn open(path: &Path) -> Result<NpyFile<BufReader<File>>, CliError> {
    let file = File::open(path).map_err(|e| bad(path, e.to_string()))?;
    let npy = NpyFile::new(BufReader::new(file)).map_err(|e| bad(path, e.to_string()))?;
    if npy.order() != npyz::Order::C {
        return Err(bad(
            path,
            "Fortran-ordered arrays are not supported; save with order='C'",
        ));
    }
    Ok(npy)
}

fn read<T: npyz::Deserialize>(path: &Path, want: &str) -> Result<Array<T>, CliError> {
    let npy = open(path)?;
    let shape: Vec<usize> = npy.shape().iter().map(|&n| n as usize).collect();
    let dtype = match npy.dtype() {
        DType::Plain(t) => t.to_string(),
        other => format!("{other:?}"),
    };
    let data = npy.into_vec::<T>().map_err(|e| {
        bad(
            path,
            format!("expected {want} elements, found dtype {dtype}: {e}"),
        )
    })?;
    if data.len() != shape.iter().product::<usize>() {
        return Err(bad(path, "file is shorter than its header says"));
    }
    Ok(Array { shape, data })
}

/// Reads a float32 array.
pub fn read_f32(path: &Path) -> Result<Array<f32>, CliError> {
    read(path, "float32")
}

/// Reads a boolean array.
pub fn read_bool(path: &Path) -> Result<Array<bool>, CliError> {
    read(path, "bool")
}

/// Writes a float32 array of the given shape.
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<(), CliError> {
    let io = |e: std::io::Error| bad(path, e.to_string());
    let file = BufWriter::new(File::create(path).map_err(io)?);
    let shape: Vec<u64> = shape.iter().map(|&n| n as u64).collect();
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&shape)
        .writer(file)
        .begin_nd()
        .map_err(io)?;
    w.extend(data.iter().copied()).map_err(io)?;
    w.finish().map_err(io)
}
