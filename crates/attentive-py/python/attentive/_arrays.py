"""NumPy and torch arrays in and out of the engine, without copies."""

import sys

import numpy as np

from . import _attentive as _C


def torch_module():
    """torch when the caller has imported it (attentive never imports it on its own)."""
    return sys.modules.get("torch")


def is_torch(x):
    torch = torch_module()
    return torch is not None and isinstance(x, torch.Tensor)


def as_numpy(x, name, dtypes=(np.float32,)):
    """A NumPy view of `x` (a NumPy array or a CPU torch tensor) over the same memory.

    Raises TypeError for another type or dtype, ValueError for a tensor on another device.
    Only arrays with negative strides (NumPy's reversed views) are copied: the engine reads
    non-negative strides.
    """
    if is_torch(x):
        if x.device.type != "cpu":
            raise ValueError(f"{name}: attentive runs on the CPU; got a tensor on {x.device}")
        if x.is_sparse or x.layout != torch_module().strided:
            raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {x.layout}")
        a = x.detach().numpy()
    elif isinstance(x, np.ndarray):
        a = x
    else:
        raise TypeError(f"{name}: expected a NumPy array or a torch tensor, got {type(x).__name__}")
    if a.dtype not in dtypes:
        want = " or ".join(np.dtype(d).name for d in dtypes)
        raise TypeError(f"{name}: expected dtype {want}, got {a.dtype}")
    if any(s < 0 for s in a.strides):
        a = np.ascontiguousarray(a)
    return a


def mask_arrays(attn_mask, name="attn_mask"):
    """A PyTorch-style mask as the engine's (`mask`, `bias`): bool keeps where True, a float
    mask is added to the scores."""
    if attn_mask is None:
        return None, None
    m = as_numpy(attn_mask, name, (np.bool_, np.float32))
    return (m, None) if m.dtype == np.bool_ else (None, m)


def doc_ids(docs):
    """Document ids `(q_ids, k_ids)` (or one array for both) as two uint32 arrays."""
    if docs is None:
        return None
    if isinstance(docs, tuple):
        q, k = docs
    else:
        q = k = docs

    def ids(x):
        a = x.detach().cpu().numpy() if is_torch(x) else np.asarray(x)
        if a.dtype.kind not in "iu":
            raise TypeError(f"docs: expected integer document ids, got dtype {a.dtype}")
        if a.size and a.min() < 0:
            raise ValueError("docs: document ids must be non-negative")
        return np.ascontiguousarray(a.reshape(-1), dtype=np.uint32)

    return ids(q), ids(k)


def slopes(alibi):
    if alibi is None:
        return None
    a = alibi.detach().cpu().numpy() if is_torch(alibi) else np.asarray(alibi)
    if a.ndim == 2:
        if not (a == a[:1]).all():
            raise ValueError("alibi_slopes: per-batch slopes must be the same for every batch")
        a = a[0]
    if a.ndim != 1:
        raise ValueError(f"alibi_slopes: expected shape (H,) or (B, H), got {a.shape}")
    return np.ascontiguousarray(a, dtype=np.float32)


def seed_for(x, dropout_p, seed):
    """The dropout seed: the given one, else one drawn from torch's generator (for tensors, so
    torch.manual_seed makes it reproducible) or NumPy's global one."""
    if dropout_p == 0.0 or seed is not None:
        return 0 if seed is None else int(seed)
    if is_torch(x):
        torch = torch_module()
        return int(torch.randint(0, 2**62, (1,)).item())
    return int(np.random.randint(0, 2**62, dtype=np.int64))


def wrap(a, like):
    """`a` as the kind of array `like` is: a torch tensor over the same memory, or as is."""
    if is_torch(like):
        return torch_module().from_numpy(a)
    return a


__all__ = ["as_numpy", "mask_arrays", "doc_ids", "slopes", "seed_for", "wrap", "is_torch", "_C"]
