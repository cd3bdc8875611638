"""See what a Transformer attends to: rollout, head statistics and offline HTML/SVG views of
attention maps given as arrays [layers, heads, Nq, Nk] with their tokens (attentive-viz)."""

import numpy as np

from . import _attentive as _C
from ._arrays import as_numpy, wrap

__all__ = ["rollout", "head_stats", "report", "heatmap_svg"]


def _maps(maps):
    return as_numpy(maps, "maps")


def rollout(maps, tokens, fusion="mean"):
    """Attention rollout (Abnar & Zuidema, 2020): [layers, N, N], layer l the rollout through
    layers 0..l; heads fused by "mean", "max" or "min"."""
    return wrap(_C.rollout(_maps(maps), list(tokens), fusion), maps)


def head_stats(maps, tokens, k_tokens=None, rows=None):
    """Per-head entropy, distance, special-token and punctuation shares, neighbours and max
    weight (Clark et al., 2019), as a list of dicts; rows: the query rows to use (bool [Nq])."""
    rows = None if rows is None else [bool(r) for r in np.asarray(rows).reshape(-1)]
    return _C.head_stats(_maps(maps), list(tokens), None if k_tokens is None else list(k_tokens),
                         rows)


def report(maps, tokens, title="attention", k_tokens=None, svgs=False):
    """The offline HTML report (index.html as a string; with svgs=True, (html, {name: svg}))."""
    return _C.report(_maps(maps), list(tokens), title,
                     None if k_tokens is None else list(k_tokens), svgs)


def heatmap_svg(m, q_tokens, k_tokens=None, title=""):
    """One map [Nq, Nk] as a standalone SVG heatmap."""
    return _C.heatmap_svg(as_numpy(m, "map"), list(q_tokens),
                          None if k_tokens is None else list(k_tokens), title)
