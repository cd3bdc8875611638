"""attn_implementation="attentive" for HF transformers models.

`import attentive` registers the attention function and its mask function (transformers'
boolean SDPA mask) in transformers' registries: at once when transformers is already imported,
otherwise as soon as it is.
"""

import importlib.abc
import importlib.util
import sys

from ._core import _attend, _options

NAME = "attentive"


def attentive_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                                scaling=None, is_causal=None, position_bias=None, softcap=None,
                                **kwargs):
    """The attention of one layer, as transformers' SDPA integration computes it.

    query [B, Hq, N, D], key and value [B, Hkv, Nk, D] (grouped heads read in place, never
    repeated); attention_mask boolean (True keeps) or additive; returns ([B, N, Hq, Dv], None),
    allocated in that layout.
    """
    if kwargs.get("s_aux") is not None:
        raise ValueError("attentive: attention sinks as learned logits (s_aux) are not supported")
    q_len = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # As transformers' SDPA path: causal only without a mask (the mask carries it otherwise)
    # and never for a single query. Top-left causal needs no cropping of longer keys.
    causal = q_len > 1 and attention_mask is None and causal
    # A boolean mask stays a mask; a float mask and T5's position bias add to the scores.
    mask, bias = attention_mask, position_bias
    if mask is not None and mask.dtype != sys.modules["torch"].bool:
        bias = mask if bias is None else bias + mask
        mask = None
    kw = _options(query, scale=scaling, causal="top-left" if causal else None, softcap=softcap,
                  attn_mask=mask, dropout_p=dropout)
    if bias is not None:
        kw["bias"] = _options(query, attn_mask=bias)["bias"]
    out, _ = _attend(query, key, value, kw, out_bnhd=True)
    return out, None


def register():
    """Registers "attentive" in transformers' AttentionInterface and AttentionMaskInterface.
    Returns False when transformers is not installed."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register(NAME, attentive_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return True


class _AfterImport(importlib.abc.MetaPathFinder):
    """Registers once transformers has been imported, so that `import attentive` does not
    import transformers (nor torch) itself."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            register()

        spec.loader.exec_module = exec_module
        return spec


def install():
    if "transformers" in sys.modules:
        register()
    elif importlib.util.find_spec("transformers") is not None:
        sys.meta_path.insert(0, _AfterImport())
