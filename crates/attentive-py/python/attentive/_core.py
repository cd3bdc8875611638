"""Exact attention: the engine's call with every option, PyTorch's and flash-attn's call shapes,
and the torch autograd Function whose backward is the fused backward."""

import numpy as np

from . import _attentive as _C
from ._arrays import as_numpy, doc_ids, is_torch, mask_arrays, seed_for, slopes, torch_module, wrap

_KV = (np.float32, np.float16)


def _bhnd(a, bnhd):
    """`a` read as [B, H, N, D]: a transposed view when it is stored [B, N, H, D]."""
    return a.transpose(0, 2, 1, 3) if bnhd else a


def _forward(q, k, v, kw, bnhd_in, out_bnhd):
    qa = _bhnd(as_numpy(q, "q"), bnhd_in)
    ka = _bhnd(as_numpy(k, "k", _KV), bnhd_in)
    va = _bhnd(as_numpy(v, "v", _KV), bnhd_in)
    return _C.forward(qa, ka, va, kw, out_bnhd=out_bnhd)


_FUNCTION = None


def _function():
    """The autograd Function, made on first use so that attentive never imports torch itself."""
    global _FUNCTION
    if _FUNCTION is not None:
        return _FUNCTION
    torch = torch_module()

    class Attention(torch.autograd.Function):
        """O, LSE = attention(Q, K, V); the backward recomputes the weights tile by tile from
        the saved O and LSE (never an N×N matrix)."""

        @staticmethod
        def forward(ctx, q, k, v, kw, bnhd_in, out_bnhd):
            o, lse = _forward(q, k, v, kw, bnhd_in, out_bnhd)
            o, lse = torch.from_numpy(o), torch.from_numpy(lse)
            ctx.save_for_backward(q, k, v, o, lse)
            ctx.kw, ctx.bnhd_in, ctx.out_bnhd = kw, bnhd_in, out_bnhd
            ctx.mark_non_differentiable(lse)
            ctx.set_materialize_grads(False)  # no zero gradient made for the LSE
            return o, lse

        @staticmethod
        def backward(ctx, d_o, d_lse):
            q, k, v, o, lse = ctx.saved_tensors
            if d_o is None:
                return None, None, None, None, None, None
            if k.dtype != torch.float32:
                raise TypeError("attentive: float16 keys and values have no backward")
            b = ctx.bnhd_in
            grads = _C.backward(
                _bhnd(q.detach().numpy(), b),
                _bhnd(k.detach().numpy(), b),
                _bhnd(v.detach().numpy(), b),
                _bhnd(o.detach().numpy(), ctx.out_bnhd),
                lse.detach().numpy(),
                _bhnd(as_numpy(d_o, "grad of the output"), ctx.out_bnhd),
                ctx.kw,
                grads_bnhd=b,
            )
            dq, dk, dv = (torch.from_numpy(g) for g in grads)
            return dq, dk, dv, None, None, None

    _FUNCTION = Attention
    return Attention


def _attend(q, k, v, kw, bnhd_in=False, out_bnhd=False):
    """(O, LSE) as the kind of array q is; differentiable when torch tensors require grad."""
    if is_torch(q):
        torch = torch_module()
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            return _function().apply(q, k, v, kw, bnhd_in, out_bnhd)
    o, lse = _forward(q, k, v, kw, bnhd_in, out_bnhd)
    return wrap(o, q), wrap(lse, q)


def _options(x, *, scale=None, causal=None, window=None, softcap=None, alibi_slopes=None,
             attn_mask=None, docs=None, pattern=None, block_mask=None, dropout_p=0.0,
             seed=None, isa=None):
    if is_torch(attn_mask) and attn_mask.requires_grad and torch_module().is_grad_enabled():
        raise ValueError("attentive: an attn_mask that requires grad is not differentiated; "
                         "detach it, or use torch's attention for a learned bias")
    mask, bias = mask_arrays(attn_mask)
    if window is not None:
        window = (int(window[0]), int(window[1]))
    return dict(
        scale=None if scale is None else float(scale),
        causal=causal,
        window=window,
        softcap=None if softcap is None else float(softcap),
        alibi=slopes(alibi_slopes),
        mask=mask,
        bias=bias,
        docs=doc_ids(docs),
        pattern=pattern,
        block_mask=block_mask,
        dropout=float(dropout_p),
        seed=seed_for(x, dropout_p, seed),
        isa=isa,
    )


def attention(q, k, v, *, scale=None, causal=None, window=None, softcap=None, alibi_slopes=None,
              attn_mask=None, docs=None, pattern=None, block_mask=None, dropout_p=0.0, seed=None,
              isa=None, return_lse=False):
    """Exact attention with every option of the engine, on [B, H, N, D] arrays.

    q is [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] (Hq a multiple of Hkv), float32
    NumPy arrays or CPU torch tensors of any strides; k and v may be float16 (forward only).

    scale: multiplies q·k (default 1/sqrt(D)); causal: "top-left" (query i sees keys j <= i) or
    "bottom-right" (j <= i + Nk - Nq); window: (left, right) keys around the bottom-right
    diagonal, a negative side open; softcap: c·tanh(s/c); alibi_slopes: (Hq,); attn_mask: bool
    (True keeps) or float (added), broadcastable to [B, Hq, Nq, Nk]; docs: document ids of packed
    sequences, one array for both sides or (q_ids, k_ids); pattern: a structured pattern such as
    "window:256,0+sink:4,512"; block_mask: a prebuilt BlockMask; dropout_p and seed: dropout of
    the weights, regenerated in the backward from the seed.

    Returns O ([B, Hq, Nq, Dv]) or (O, LSE) with return_lse; the same kind of array as q.
    """
    kw = _options(q, scale=scale, causal=causal, window=window, softcap=softcap,
                  alibi_slopes=alibi_slopes, attn_mask=attn_mask, docs=docs, pattern=pattern,
                  block_mask=block_mask, dropout_p=dropout_p, seed=seed, isa=isa)
    o, lse = _attend(q, k, v, kw)
    return (o, lse) if return_lse else o


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False, **engine):
    """torch.nn.functional.scaled_dot_product_attention, on attentive's fused kernel.

    [B, H, N, D] or [H, N, D]; is_causal is top-left (query i sees keys j <= i); a bool mask
    keeps where True, a float mask is added; key/value heads fewer than query heads need
    enable_gqa=True, as in PyTorch. On torch tensors that require grad the result is
    differentiable, and its backward is attentive's fused backward. Extra keyword arguments are
    those of `attention` (softcap, window, pattern, docs, block_mask, seed, isa).
    """
    if is_causal and attn_mask is not None:
        raise ValueError("scaled_dot_product_attention: attn_mask and is_causal=True together")
    three = query.ndim == 3
    if three:
        query, key, value = query[None], key[None], value[None]
        if attn_mask is not None and attn_mask.ndim == 4:
            raise ValueError("scaled_dot_product_attention: a 4-D attn_mask with 3-D inputs")
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        raise ValueError(
            f"scaled_dot_product_attention: expected [B, H, N, D] or [H, N, D], got query "
            f"{tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}")
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(
            f"scaled_dot_product_attention: {query.shape[1]} query heads and {key.shape[1]} "
            "key/value heads need enable_gqa=True")
    o = attention(query, key, value, scale=scale, causal="top-left" if is_causal else None,
                  attn_mask=attn_mask, dropout_p=dropout_p, **engine)
    return o[0] if three else o


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=True,
                    return_attn_probs=False, *, seed=None, isa=None):
    """flash_attn.flash_attn_func, on attentive's fused kernel.

    q [B, Nq, H, D], k and v [B, Nk, Hkv, D]; causal is bottom-right (query i sees keys
    j <= i + Nk - Nq); window_size (left, right), -1 open; softcap 0 means none; alibi_slopes
    (H,) adds -slope·|i + Nk - Nq - j|. The backward is always deterministic. Returns out
    [B, Nq, H, Dv], or (out, softmax_lse [B, H, Nq], None) with return_attn_probs.
    """
    del deterministic  # attentive's backward sums in a fixed order
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"flash_attn_func: {name} must be [B, N, H, D], got {tuple(x.shape)}")
    window = None if tuple(window_size) == (-1, -1) else tuple(window_size)
    kw = _options(q, scale=softmax_scale, causal="bottom-right" if causal else None,
                  window=window, softcap=softcap or None, alibi_slopes=alibi_slopes,
                  dropout_p=dropout_p, seed=seed, isa=isa)
    o, lse = _attend(q, k, v, kw, bnhd_in=True, out_bnhd=True)
    return (o, lse, None) if return_attn_probs else o


def attention_probabilities(q, k, *, scale=None, causal=None, window=None, softcap=None,
                            alibi_slopes=None, attn_mask=None, docs=None, pattern=None,
                            block_mask=None, isa=None):
    """The attention weights themselves, [B, Hq, Nq, Nk] (0 where masked), from q [B, Hq, Nq, D]
    and k [B, Hkv, Nk, D]: the N×N matrix the fused kernel never stores, for when you want to
    look. Options as for `attention`."""
    kw = _options(q, scale=scale, causal=causal, window=window, softcap=softcap,
                  alibi_slopes=alibi_slopes, attn_mask=attn_mask, docs=docs, pattern=pattern,
                  block_mask=block_mask, isa=isa)
    del kw["dropout"], kw["seed"]
    p = _C.probabilities(as_numpy(q, "q"), as_numpy(k, "k"), kw)
    return wrap(p, q)


def merge(o1, lse1, o2, lse2):
    """(O, LSE) of attention over the union of two disjoint key sets, from each part's output
    ([..., Dv]) and log-sum-exp ([...]): how decode splits and ring attention combine."""
    o, lse = _C.merge(as_numpy(o1, "o1"), as_numpy(lse1, "lse1"), as_numpy(o2, "o2"),
                      as_numpy(lse2, "lse2"))
    return wrap(o, o1), wrap(lse, o1)
