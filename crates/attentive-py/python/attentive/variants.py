"""Attention beyond softmax over a mask, each variant with its parameters explicit (forward).

q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv], float32 NumPy arrays or CPU torch
tensors, read in place; the result is the same kind of array. The math, conventions and
oracles of each are in the engine's `attentive::variants` documentation.
"""

import numpy as np

from . import _attentive as _C
from ._arrays import as_numpy, wrap

__all__ = ["linear", "gated_linear", "performer", "linformer", "nystrom", "lsh",
           "adaptive_span", "additive", "han_pool"]


def _arrays(**xs):
    return {name: None if x is None else as_numpy(x, name) for name, x in xs.items()}


def _mask(key_mask):
    if key_mask is None:
        return None
    m = as_numpy(key_mask, "key_mask", (np.bool_,))
    return np.ascontiguousarray(m)


def linear(q, k, v, *, causal=False, eps=1e-6, key_mask=None):
    """Linear attention (Katharopoulos et al., 2020), phi = elu + 1; key_mask [B, Nk] (True
    keeps)."""
    out = _C.linear_attention(**_arrays(q=q, k=k, v=v), causal=causal, eps=eps,
                              key_mask=_mask(key_mask))
    return wrap(out, q)


def gated_linear(q, k, v, *, log_decay=None, log_gates=None, scale=None):
    """RetNet's decayed (log_decay [Hkv]) or GLA's gated (log_gates [B, Hkv, N, D]) linear
    attention, causal."""
    gates = None if log_gates is None else as_numpy(log_gates, "log_gates")
    decay = None if log_decay is None else np.ascontiguousarray(log_decay, dtype=np.float32)
    out = _C.gated_linear_attention(**_arrays(q=q, k=k, v=v), log_decay=decay,
                                    log_gates=gates, scale=scale)
    return wrap(out, q)


def performer(q, k, v, *, num_features=256, seed=0, features=None, causal=False, key_mask=None):
    """Performer's FAVOR+ with positive orthogonal random features (drawn from seed, or the
    features given as [m, D])."""
    f = None if features is None else np.ascontiguousarray(as_numpy(features, "features"))
    out = _C.performer_attention(**_arrays(q=q, k=k, v=v), num_features=num_features,
                                 seed=seed, features=f, causal=causal, key_mask=_mask(key_mask))
    return wrap(out, q)


def linformer(q, k, v, e, f=None, *, scale=None):
    """Linformer: keys and values projected along the sequence by e [Nk, k] (and f, else e)."""
    e = np.ascontiguousarray(as_numpy(e, "e"))
    f = None if f is None else np.ascontiguousarray(as_numpy(f, "f"))
    return wrap(_C.linformer_attention(**_arrays(q=q, k=k, v=v), e=e, f=f, scale=scale), q)


def nystrom(q, k, v, *, landmarks, iterations=None):
    """Nyströmformer with `landmarks` landmarks (dividing N)."""
    return wrap(_C.nystrom_attention(**_arrays(q=q, k=k, v=v), landmarks=landmarks,
                                     iterations=iterations), q)


def lsh(x, v, *, n_buckets, n_hashes=2, bucket_size=64, causal=False, seed=0, key_mask=None):
    """Reformer's LSH attention over shared queries and keys x [B, H, N, D]."""
    out = _C.lsh_attention(as_numpy(x, "x"), as_numpy(v, "v"), n_buckets=n_buckets,
                           n_hashes=n_hashes, bucket_size=bucket_size, causal=causal, seed=seed,
                           key_mask=_mask(key_mask))
    return wrap(out, x)


def adaptive_span(q, k, v, *, current, max_span, ramp=32):
    """Adaptive attention span (causal): span fractions `current` [Hq] of `max_span` keys, a
    soft ramp of `ramp` keys."""
    cur = np.ascontiguousarray(current, dtype=np.float32)
    return wrap(_C.adaptive_span_attention(**_arrays(q=q, k=k, v=v), current=cur,
                                           max_span=max_span, ramp=ramp), q)


def additive(q, k, v, *, score="additive", w_q=None, w_k=None, w=None, v_a=None,
             key_mask=None):
    """Bahdanau's additive score (w_q [A, Dq], w_k [A, Dk], v_a [A]) or Luong's "dot",
    "general" (w [Dq, Dk]) or "concat" (w [A, Dq + Dk], v_a [A]); returns (out, weights)."""
    c = lambda x, n: None if x is None else np.ascontiguousarray(as_numpy(x, n))  # noqa: E731
    out, weights = _C.additive_attention(**_arrays(q=q, k=k, v=v), score=score,
                                         w_q=c(w_q, "w_q"), w_k=c(w_k, "w_k"), w=c(w, "w"),
                                         v_a=c(v_a, "v_a"), key_mask=_mask(key_mask))
    return wrap(out, q), wrap(weights, q)


def han_pool(h, w, b, c, mask=None):
    """Hierarchical attention pooling of h [groups, N, D] with W [A, D], b [A], context c [A];
    returns (pooled [groups, D], weights [groups, N])."""
    arr = lambda x, n: np.ascontiguousarray(as_numpy(x, n))  # noqa: E731
    s, alpha = _C.han_pool(as_numpy(h, "h"), arr(w, "w"), arr(b, "b"), arr(c, "c"),
                           mask=_mask(mask))
    return wrap(s, h), wrap(alpha, h)
