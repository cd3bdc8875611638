"""attentive: exact fused attention on the CPU, forward and backward, from Python.

NumPy arrays and CPU torch tensors (float32, any non-negative strides) are read in place and
results come back as the same kind of array; the kernel runs with the GIL released.

* `scaled_dot_product_attention` — PyTorch's call, differentiable on tensors that require grad
  (the backward is attentive's fused backward: O and the log-sum-exp saved, never the weights).
* `flash_attn_func` — flash-attn's call shape ([B, N, H, D], bottom-right causal, windows,
  soft-capping, ALiBi).
* `attention` — every option of the engine: structured patterns ("window:256,0+sink:4,512"),
  document ids of packed sequences, prebuilt `BlockMask`s, float16 keys and values.
* `attention_probabilities`, `merge`.
* `attentive.variants` — linear, gated, Performer, Linformer, Nyströmformer, LSH, adaptive span,
  additive and hierarchical attention; `attentive.viz` — rollout, head statistics and the
  HTML/SVG views of attention maps.
* With transformers installed, `attn_implementation="attentive"` in `from_pretrained`.

Threads: one per core by default; `RAYON_NUM_THREADS` or `set_num_threads(n)` before the first
call sets the count.
"""

from . import _hf
from ._attentive import (AttentionError, BlockMask, instruction_sets, num_threads,
                         set_num_threads)
from ._core import (attention, attention_probabilities, flash_attn_func, merge,
                    scaled_dot_product_attention)
from . import variants, viz

__all__ = [
    "AttentionError", "BlockMask", "attention", "attention_probabilities", "flash_attn_func",
    "instruction_sets", "merge", "num_threads", "scaled_dot_product_attention",
    "set_num_threads", "variants", "viz",
]

_hf.install()
