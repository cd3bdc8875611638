//! Reading and writing NumPy `.npy` files (through the `npyz` crate), with errors that name the
//! file and what is wrong with it.
//!
//! A file's header is checked before `npyz` reads it: the declared shape must be a tuple of
//! integers whose product (each extent counted as at least 1) fits in 64 bits, and the elements
//! it declares must fit in the bytes the file holds. A hostile header (a shape of 2⁶⁴ elements in
//! a 100-byte file) is refused with an error before anything is allocated for it.

use crate::error::CliError;
use npyz::{DType, NpyFile, WriterBuilder};
use std::fs::File;
use std::io::{BufReader, BufWriter, Cursor, Read, Seek, SeekFrom};
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

/// Longest header accepted: NumPy writes under 100 bytes for any array it can hold; format
/// 2.0 allows 4 GiB, which would be read into memory whole.
const MAX_HEADER: u64 = 1 << 16;

/// The shape a `.npy` header declares, checked against the `len` bytes of the whole file, read
/// from `r` without allocating more than the header's length. `r` is left where it started.
fn preflight(r: &mut (impl Read + Seek), len: u64, path: &Path) -> Result<(), CliError> {
    let io = |e: std::io::Error| bad(path, format!("not a .npy file: {e}"));
    let start = r.stream_position().map_err(io)?;
    let mut head = [0u8; 12];
    let got = read_up_to(r, &mut head).map_err(io)?;
    if got < 10 || &head[..6] != b"\x93NUMPY" {
        return Err(bad(path, "not a .npy file (no \\x93NUMPY magic)"));
    }
    let (header_len, prefix) = match head[6] {
        1 => (u64::from(u16::from_le_bytes([head[8], head[9]])), 10),
        2 | 3 if got == 12 => (
            u64::from(u32::from_le_bytes([head[8], head[9], head[10], head[11]])),
            12,
        ),
        v => return Err(bad(path, format!("unsupported .npy format version {v}"))),
    };
    if header_len > MAX_HEADER {
        return Err(bad(
            path,
            format!("header of {header_len} bytes (at most {MAX_HEADER})"),
        ));
    }
    let data_bytes = len
        .checked_sub(prefix + header_len)
        .ok_or_else(|| bad(path, "file is shorter than its header says"))?;
    r.seek(SeekFrom::Start(start + prefix)).map_err(io)?;
    let mut text = vec![0u8; header_len as usize];
    r.read_exact(&mut text).map_err(io)?;
    r.seek(SeekFrom::Start(start)).map_err(io)?;
    let text = String::from_utf8_lossy(&text);
    // The plain dtypes read here have headers of one dict with one tuple (the shape). Nested
    // brackets mean a structured dtype or worse, and the header parser below takes time
    // exponential in their depth (28 s for 40 levels, found by fuzzing): refused first.
    let count = |c: char| text.matches(c).count();
    if count('{') != 1 || count('(') > 1 || count('[') > 0 {
        return Err(bad(
            path,
            "only plain dtypes are read (the header holds nested brackets: a structured dtype?)",
        ));
    }
    let shape = declared_shape(&text).ok_or_else(|| {
        bad(
            path,
            format!("header has no readable shape: {}", text.trim_end()),
        )
    })?;
    let overflow = || bad(path, format!("shape {shape:?} has more than 2^64 elements"));
    shape
        .iter()
        .try_fold(1u64, |acc, &n| acc.checked_mul(n.max(1)))
        .ok_or_else(overflow)?;
    let elements = shape.iter().product::<u64>();
    if elements > data_bytes {
        return Err(bad(
            path,
            format!("shape {shape:?} declares {elements} elements, but the file holds {data_bytes} bytes of data"),
        ));
    }
    Ok(())
}

/// Reads until `buf` is full or the input ends; the bytes read.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

/// The integers of the `'shape': (…)` entry of a header's dict literal.
fn declared_shape(header: &str) -> Option<Vec<u64>> {
    let at = header
        .find("'shape'")
        .or_else(|| header.find("\"shape\""))?;
    let rest = header[at + 7..]
        .trim_start()
        .strip_prefix(':')?
        .trim_start();
    let inner = &rest.strip_prefix('(')?[..rest[1..].find(')')?];
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<u64>().ok())
        .collect()
}

/// The file at `path`, opened and its header checked.
fn open(path: &Path) -> Result<NpyFile<BufReader<File>>, CliError> {
    let file = File::open(path).map_err(|e| bad(path, e.to_string()))?;
    let len = file.metadata().map_err(|e| bad(path, e.to_string()))?.len();
    let mut r = BufReader::new(file);
    preflight(&mut r, len, path)?;
    start(r, path)
}

fn start<R: Read>(r: R, path: &Path) -> Result<NpyFile<R>, CliError> {
    let npy = NpyFile::new(r).map_err(|e| bad(path, e.to_string()))?;
    if npy.order() != npyz::Order::C {
        return Err(bad(
            path,
            "Fortran-ordered arrays are not supported; save with order='C'",
        ));
    }
    Ok(npy)
}

fn elements<T: npyz::Deserialize, R: Read>(
    npy: NpyFile<R>,
    path: &Path,
    want: &str,
) -> Result<Array<T>, CliError> {
    let shape: Vec<usize> = npy
        .shape()
        .iter()
        .map(|&n| usize::try_from(n).map_err(|_| bad(path, format!("extent {n} is too large"))))
        .collect::<Result<_, _>>()?;
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
    elements(open(path)?, path, "float32")
}

/// Reads a boolean array.
pub fn read_bool(path: &Path) -> Result<Array<bool>, CliError> {
    elements(open(path)?, path, "bool")
}

/// Reads an integer array (int32, int64, uint32 or uint64) of ids in `0..2³²`.
pub fn read_ids(path: &Path) -> Result<Array<u32>, CliError> {
    ids(open(path)?, path)
}

fn ids<R: Read>(npy: NpyFile<R>, path: &Path) -> Result<Array<u32>, CliError> {
    let kind = match npy.dtype() {
        DType::Plain(t) => (t.type_char(), t.size_field()),
        other => {
            return Err(bad(
                path,
                format!("expected integer ids, found dtype {other:?}"),
            ))
        }
    };
    let wide: Array<i128> = match kind {
        (npyz::TypeChar::Int, 4) => widen(elements::<i32, _>(npy, path, "int32")?),
        (npyz::TypeChar::Int, 8) => widen(elements::<i64, _>(npy, path, "int64")?),
        (npyz::TypeChar::Uint, 4) => widen(elements::<u32, _>(npy, path, "uint32")?),
        (npyz::TypeChar::Uint, 8) => widen(elements::<u64, _>(npy, path, "uint64")?),
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

/// A float32 `.npy` file read or written in place, rows at a time (the ranks of a ring each
/// read and write only their own rows): its shape and the byte where its elements start.
pub struct F32File {
    pub shape: Vec<usize>,
    pub data_at: u64,
}

/// The header of the float32 (little-endian, C-ordered) file at `path`, checked as
/// [`read_f32`] checks it.
pub fn f32_header(path: &Path) -> Result<F32File, CliError> {
    let npy = open(path)?;
    match npy.dtype() {
        DType::Plain(t) if t.to_string() == "<f4" => {}
        other => {
            return Err(bad(
                path,
                format!("expected little-endian float32 elements, found dtype {other:?}"),
            ))
        }
    }
    let shape: Vec<usize> = npy
        .shape()
        .iter()
        .map(|&n| usize::try_from(n).map_err(|_| bad(path, format!("extent {n} is too large"))))
        .collect::<Result<_, _>>()?;
    let mut head = [0u8; 12];
    let mut f = File::open(path).map_err(|e| bad(path, e.to_string()))?;
    read_up_to(&mut f, &mut head).map_err(|e| bad(path, e.to_string()))?;
    let data_at = match head[6] {
        1 => 10 + u64::from(u16::from_le_bytes([head[8], head[9]])),
        _ => 12 + u64::from(u32::from_le_bytes([head[8], head[9], head[10], head[11]])),
    };
    // Rows are read in place, so every element the shape declares must be in the file.
    let len = f.metadata().map_err(|e| bad(path, e.to_string()))?.len();
    let count = (shape.iter()).try_fold(1u64, |a, &n| a.checked_mul(n as u64));
    let need = count.and_then(|c| c.checked_mul(4));
    if need.is_none_or(|b| b > len.saturating_sub(data_at)) {
        return Err(bad(
            path,
            format!(
                "shape {shape:?} needs {} bytes of float32 data, the file holds {}",
                need.map_or("more than 2^64".into(), |b| b.to_string()),
                len.saturating_sub(data_at)
            ),
        ));
    }
    Ok(F32File { shape, data_at })
}

/// Reads the elements `[start, end)` of each range, in order, from a file [`f32_header`] checked.
pub fn read_f32_ranges(
    path: &Path,
    file: &F32File,
    ranges: impl Iterator<Item = std::ops::Range<usize>>,
) -> Result<Vec<f32>, CliError> {
    use std::os::unix::fs::FileExt;
    let io = |e: std::io::Error| bad(path, e.to_string());
    let f = File::open(path).map_err(io)?;
    let mut out = Vec::new();
    let mut bytes = Vec::new();
    for r in ranges {
        bytes.resize(r.len() * 4, 0);
        f.read_exact_at(&mut bytes, file.data_at + r.start as u64 * 4)
            .map_err(io)?;
        out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
    }
    Ok(out)
}

/// Creates a float32 file of `shape` at `path`, its elements zero (a sparse file), for
/// [`write_f32_at`] to fill; the byte where its elements start.
pub fn create_f32(path: &Path, shape: &[usize]) -> Result<u64, CliError> {
    use std::io::Write;
    let io = |e: std::io::Error| bad(path, e.to_string());
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let tuple = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple}, }}");
    // NumPy pads the header with spaces and a newline so that the data starts 64-byte aligned.
    let len = 10 + header.len() + 1;
    header.push_str(&" ".repeat(len.next_multiple_of(64) - len));
    header.push('\n');
    let mut f = File::create(path).map_err(io)?;
    f.write_all(b"\x93NUMPY\x01\x00").map_err(io)?;
    let hlen = u16::try_from(header.len()).map_err(|_| bad(path, "shape too long"))?;
    f.write_all(&hlen.to_le_bytes()).map_err(io)?;
    f.write_all(header.as_bytes()).map_err(io)?;
    let count = shape.iter().try_fold(1u64, |a, &n| a.checked_mul(n as u64));
    let bytes = count
        .and_then(|c| c.checked_mul(4))
        .ok_or_else(|| bad(path, "too large"))?;
    let data_at = 10 + header.len() as u64;
    f.set_len(data_at + bytes).map_err(io)?;
    Ok(data_at)
}

/// Writes `data` as the elements from `at` on of a file [`create_f32`] made.
pub fn write_f32_at(
    f: &File,
    path: &Path,
    data_at: u64,
    at: usize,
    data: &[f32],
) -> Result<(), CliError> {
    use std::os::unix::fs::FileExt;
    let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
    f.write_all_at(&bytes, data_at + at as u64 * 4)
        .map_err(|e| bad(path, e.to_string()))
}

/// The kinds of array the command reads, parsed from the bytes of a `.npy` file (named `name`
/// in errors) exactly as from a file: for tests and fuzzing.
pub enum Parsed {
    F32(Array<f32>),
    Bool(Array<bool>),
    Ids(Array<u32>),
}

/// Parses `bytes` as the `want` kind of [`Parsed`] (0: float32, 1: bool, else ids).
pub fn parse(bytes: &[u8], want: u8) -> Result<Parsed, CliError> {
    let path = Path::new("<bytes>");
    let mut r = Cursor::new(bytes);
    preflight(&mut r, bytes.len() as u64, path)?;
    let npy = start(r, path)?;
    Ok(match want {
        0 => Parsed::F32(elements(npy, path, "float32")?),
        1 => Parsed::Bool(elements(npy, path, "bool")?),
        _ => Parsed::Ids(ids(npy, path)?),
    })
}
