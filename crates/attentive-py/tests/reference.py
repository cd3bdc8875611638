"""The naive NumPy attention every test compares against, in float64 (the oracle) or float32 (the
baseline of the accuracy rule), and the rule itself (LIMITS.md):

    max|got - oracle| <= factor * max|naive_f32 - oracle| + 4 ulps of the largest oracle value

factor 2 for outputs, 3 for gradients.
"""

import numpy as np


def scores(q, k, *, scale=None, causal=None, window=None, softcap=None, alibi=None, mask=None,
           docs=None, dtype=np.float64):
    """Logits [B, Hq, Nq, Nk] with -inf where masked, in `dtype`."""
    q, k = q.astype(dtype), k.astype(dtype)
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    k = np.repeat(k, hq // hkv, axis=1)
    scale = dtype(1.0 / np.sqrt(d) if scale is None else scale)
    s = np.einsum("bhid,bhjd->bhij", q, k) * scale
    if softcap is not None:
        s = softcap * np.tanh(s / softcap)
    i = np.arange(nq)[:, None]
    j = np.arange(nk)[None, :]
    diag = i + nk - nq  # the bottom-right diagonal
    if alibi is not None:
        s = s - np.asarray(alibi, dtype)[None, :, None, None] * np.abs(diag - j).astype(dtype)
    keep = np.ones((nq, nk), bool)
    if causal == "top-left":
        keep &= j <= i
    elif causal == "bottom-right":
        keep &= j <= diag
    if window is not None:
        left, right = window
        if left >= 0:
            keep &= j >= diag - left
        if right >= 0:
            keep &= j <= diag + right
    if docs is not None:
        dq, dk = docs
        keep = keep & (np.asarray(dq)[:, None] == np.asarray(dk)[None, :])
    keep = np.broadcast_to(keep, s.shape)
    if mask is not None:
        if mask.dtype == np.bool_:
            keep = keep & mask
        else:
            s = s + mask.astype(dtype)
    return np.where(keep, s, -np.inf)


def attention(q, k, v, dtype=np.float64, **opts):
    """(O, LSE, P): rows that see no key give O = 0, LSE = -inf."""
    s = scores(q, k, dtype=dtype, **opts)
    hq, hkv = q.shape[1], k.shape[1]
    v = np.repeat(v.astype(dtype), hq // hkv, axis=1)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    e = np.exp(s - m)
    z = e.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(z > 0, e / z, 0)
        lse = np.where(z[..., 0] > 0, np.log(z[..., 0]) + m[..., 0], -np.inf)
    return np.einsum("bhij,bhjd->bhid", p, v), lse, p


def grads(q, k, v, d_o, dtype=np.float64, **opts):
    """(dq, dk, dv) of sum(O * d_o), by the chain rule through the softmax."""
    o, _, p = attention(q, k, v, dtype=dtype, **opts)
    b, hq, nq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    scale = dtype(1.0 / np.sqrt(d) if opts.get("scale") is None else opts["scale"])
    d_o = d_o.astype(dtype)
    kr = np.repeat(k.astype(dtype), g, axis=1)
    vr = np.repeat(v.astype(dtype), g, axis=1)
    dv = np.einsum("bhij,bhid->bhjd", p, d_o)
    dp = np.einsum("bhid,bhjd->bhij", d_o, vr)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
    if opts.get("softcap") is not None:
        c = opts["softcap"]
        raw = np.einsum("bhid,bhjd->bhij", q.astype(dtype), kr) * scale
        ds = ds * (1 - np.tanh(raw / c) ** 2)
    ds = ds * scale
    dq = np.einsum("bhij,bhjd->bhid", ds, kr)
    dk = np.einsum("bhij,bhid->bhjd", ds, q.astype(dtype))
    fold = lambda x: x.reshape(b, hkv, g, *x.shape[2:]).sum(axis=2)
    return dq, fold(dk), fold(dv)


def rule(name, got, oracle, naive, factor=2.0):
    """Asserts the accuracy rule; returns error / allowed."""
    got, oracle, naive = (np.asarray(x, np.float64) for x in (got, oracle, naive))
    finite = np.isfinite(oracle)
    assert (np.isfinite(got) == finite).all(), f"{name}: non-finite where the oracle is not"
    assert (got[~finite] == oracle[~finite]).all(), f"{name}: wrong infinities"
    if not finite.any():
        return 0.0
    err = np.abs(got[finite] - oracle[finite]).max()
    base = np.abs(naive[finite] - oracle[finite]).max()
    floor = 4 * float(np.spacing(np.float32(np.abs(oracle[finite]).max())))
    allowed = factor * base + floor
    assert err <= allowed, f"{name}: error {err:.3e} > {factor} x naive f32 {base:.3e} + {floor:.1e}"
    return err / allowed
