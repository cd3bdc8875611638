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

/// Reads an integer array (int32, int64, uint32 or uint64) of ids in `0..2³²`.
pub fn read_ids(path: &Path) -> Result<Array<u32>, CliError> {
    let kind = match open(path)?.dtype() {
        DType::Plain(t) => (t.type_char(), t.size_field()),
        other => {
            return Err(bad(
                path,
                format!("expected integer ids, found dtype {other:?}"),
            ))
        }
    };
    let wide: Array<i128> = match kind {
        (npyz::TypeChar::Int, 4) => widen(read::<i32>(path, "int32")?),
        (npyz::TypeChar::Int, 8) => widen(read::<i64>(path, "int64")?),
        (npyz::TypeChar::Uint, 4) => widen(read::<u32>(path, "uint32")?),
        (npyz::TypeChar::Uint, 8) => widen(read::<u64>(path, "uint64")?),
        _ => return Err(bad(path, "expected int32, int64, uint32 or uint64 ids")),
    };
    let data = wide
        .data
        .iter()
        .map(|&x| u32::try_from(x).map_err(|_| bad(path, format!("id {x} is not in 0..2^32"))))
        .collect::<Result<_, _>>()?;
    Ok(Array {
        shape: wide.shape,
        data,
    })
}

fn widen<T: Into<i128>>(a: Array<T>) -> Array<i128> {
    Array {
        shape: a.shape,
        data: a.data.into_iter().map(Into::into).collect(),
    }
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
