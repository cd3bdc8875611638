//! The engine's side of a candle op: arguments as row-major slices with their shapes, and the
//! buffers an engine call writes, handed back to candle as storage or as gradients.

use attentive::{View, ViewMut};
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};

pub(crate) fn err(e: attentive::AttnError) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// An op's input: its row-major f32 elements (borrowed from candle's storage in a forward,
/// copied from the tensor in a backward) and its 4-D shape.
pub(crate) struct Arg<D> {
    pub data: D,
    pub shape: [usize; 4],
}

impl<'a> Arg<&'a [f32]> {
    /// A forward's argument; the ops are given contiguous tensors.
    pub fn of(s: &'a CpuStorage, l: &Layout, name: &str) -> Result<Self> {
        let CpuStorage::F32(d) = s else {
            candle_core::bail!("attention: {name} must be f32");
        };
        let shape = shape4(l.dims(), name)?;
        match l.contiguous_offsets() {
            Some((a, b)) => Ok(Self {
                data: &d[a..b],
                shape,
            }),
            None => candle_core::bail!("attention: {name} must be contiguous"),
        }
    }
}

impl Arg<Vec<f32>> {
    /// A backward's argument.
    pub fn host(t: &Tensor) -> Result<Self> {
        Ok(Self {
            shape: shape4(t.dims(), "a tensor")?,
            data: t.flatten_all()?.to_vec1::<f32>()?,
        })
    }
}

impl<D: AsRef<[f32]>> Arg<D> {
    pub fn view(&self) -> Result<View<'_>> {
        View::contiguous(self.data.as_ref(), &self.shape).map_err(err)
    }
}

fn shape4(dims: &[usize], name: &str) -> Result<[usize; 4]> {
    dims.try_into()
        .map_err(|_| candle_core::Error::Msg(format!("{name} must be 4-D [B, H, N, D]")))
}

/// A buffer an engine call writes: an output or a gradient, row-major.
pub(crate) struct Buf {
    pub data: Vec<f32>,
    pub shape: [usize; 4],
}

impl Buf {
    pub fn zeros(shape: [usize; 4]) -> Self {
        Self {
            data: vec![0.0; shape.iter().product()],
            shape,
        }
    }

    pub fn view(&mut self) -> Result<ViewMut<'_>> {
        ViewMut::contiguous(&mut self.data, self.shape).map_err(err)
    }

    /// As a forward's result.
    pub fn storage(self) -> (CpuStorage, Shape) {
        (CpuStorage::F32(self.data), Shape::from(self.shape.to_vec()))
    }

    /// As the gradient of `like`.
    pub fn grad(self, like: &Tensor) -> Result<Option<Tensor>> {
        Tensor::from_vec(self.data, like.shape(), like.device()).map(Some)
    }
}

/// The output `[B, Hq, Nq, Dv]` of queries `q` and values of width `dv`.
pub(crate) fn output(q: [usize; 4], dv: usize) -> Buf {
    Buf::zeros([q[0], q[1], q[2], dv])
}
