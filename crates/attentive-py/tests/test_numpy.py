"""attentive on NumPy arrays: against the float64 reference by the accuracy rule, in place on
strided views, typed errors for bad input, and the GIL released while the kernel runs."""

import threading
import time

import numpy as np
import pytest

import attentive
import reference as ref

RNG = np.random.default_rng(7)


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def check_forward(q, k, v, isa=None, **opts):
    """attentive.attention against the oracle, O and LSE, by the rule."""
    engine = dict(opts)
    if "alibi" in engine:
        engine["alibi_slopes"] = engine.pop("alibi")
    if "mask" in engine:
        engine["attn_mask"] = engine.pop("mask")
    o, lse = attentive.attention(q, k, v, return_lse=True, isa=isa, **engine)
    o64, lse64, _ = ref.attention(q, k, v, **opts)
    o32, lse32, _ = ref.attention(q, k, v, dtype=np.float32, **opts)
    assert o.dtype == np.float32 and o.shape == o64.shape and lse.shape == lse64.shape
    ref.rule("o", o, o64, o32)
    ref.rule("lse", lse, lse64, lse32)
    return o, lse


# (B, Hq, Hkv, Nq, Nk, D, Dv): awkward sizes, single rows and keys, grouped heads.
SHAPES = [
    (1, 1, 1, 1, 1, 8, 8),
    (2, 4, 4, 33, 47, 16, 16),
    (1, 8, 2, 130, 130, 64, 64),
    (3, 2, 1, 65, 200, 40, 24),
    (1, 2, 2, 257, 129, 96, 96),
    (1, 1, 1, 7, 513, 128, 128),
]

OPTIONS = [
    {},
    {"causal": "top-left"},
    {"causal": "bottom-right"},
    {"window": (16, 0)},
    {"window": (-1, 3), "causal": "bottom-right"},
    {"softcap": 5.0, "scale": 0.9},
    {"alibi": True},
    {"mask": "bool"},
    {"mask": "float"},
    {"docs": True},
]


def realise(opts, b, hq, nq, nk):
    """Concrete option values for a shape."""
    out = {}
    for key, val in opts.items():
        if key == "alibi":
            out[key] = (2.0 ** -np.arange(1, hq + 1)).astype(np.float32)
        elif key == "mask" and val == "bool":
            m = RNG.random((b, 1, nq, nk)) < 0.7
            m[..., 0] = True
            out[key] = m
        elif key == "mask":
            out[key] = np.where(RNG.random((1, hq, nq, nk)) < 0.2, -np.inf,
                                RNG.standard_normal((1, hq, nq, nk))).astype(np.float32)
            out[key][..., 0] = 0.0
        elif key == "docs":
            out[key] = (np.arange(nq) * 3 // nq, np.arange(nk) * 3 // nk)
        else:
            out[key] = val
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "+".join(o) or "plain")
def test_forward_matches_the_oracle(shape, opts):
    b, hq, hkv, nq, nk, d, dv = shape
    q, k, v = rand(b, hq, nq, d), rand(b, hkv, nk, d), rand(b, hkv, nk, dv)
    check_forward(q, k, v, **realise(opts, b, hq, nq, nk))


@pytest.mark.parametrize("isa", attentive.instruction_sets())
def test_every_instruction_set(isa):
    q, k, v = rand(2, 4, 300, 64), rand(2, 2, 300, 64), rand(2, 2, 300, 64)
    check_forward(q, k, v, isa=isa, causal="top-left")


def test_backward_matches_the_oracle():
    for shape, opts in [((1, 4, 2, 70, 90, 32, 48), {}),
                        ((2, 2, 2, 129, 129, 64, 64), {"causal": "top-left"}),
                        ((1, 2, 1, 100, 160, 16, 16), {"softcap": 3.0, "window": (20, 5)})]:
        b, hq, hkv, nq, nk, d, dv = shape
        q, k, v, d_o = rand(b, hq, nq, d), rand(b, hkv, nk, d), rand(b, hkv, nk, dv), rand(b, hq, nq, dv)
        o, lse = attentive.attention(q, k, v, return_lse=True, **opts)
        got = attentive._attentive.backward(q, k, v, o, lse, d_o, opts)
        want = ref.grads(q, k, v, d_o, **opts)
        naive = ref.grads(q, k, v, d_o, dtype=np.float32, **opts)
        for name, g, w, n in zip(("dq", "dk", "dv"), got, want, naive):
            assert g.shape == w.shape
            ref.rule(name, g, w, n, factor=3.0)


def test_strided_views_are_read_in_place():
    # [B, N, H, D] storage seen as [B, H, N, D], a slice of a fused QKV projection, and every
    # other row: the same results as contiguous copies.
    qkv = rand(2, 150, 3, 4, 32)  # [B, N, (q, k, v), H, D]
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    assert not q.flags.c_contiguous
    o = attentive.attention(q, k, v, causal="top-left")
    o_copy = attentive.attention(*(np.ascontiguousarray(x) for x in (q, k, v)), causal="top-left")
    np.testing.assert_array_equal(o, o_copy)
    sparse = rand(1, 2, 400, 16)[:, :, ::2]
    np.testing.assert_array_equal(attentive.attention(sparse, sparse, sparse),
                                  attentive.attention(*(np.ascontiguousarray(sparse),) * 3))
    # Reversed views (negative strides) are copied, and still right.
    rev = q[:, :, ::-1]
    check_forward(rev, k, v)


COPY_PROBE = """
import resource, numpy as np, attentive
small = np.ones((1, 8, 16, 64), np.float32)
attentive.attention(small, small, small)
big = np.random.default_rng(0).standard_normal((1, 8, 16384, 128), dtype=np.float32)
q = big[:, :, :, :64]  # strided: the first half of every row, 32 MiB of elements
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
before = peak()
o = attentive.attention(q, small, small)
print(q.nbytes, o.nbytes, peak() - before)
"""


def test_inputs_are_not_copied():
    # In a fresh process, so that the peak resident size moves only with this call: it grows
    # by the output, not by a copy of the strided query as well.
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", COPY_PROBE], check=True, capture_output=True,
                         text=True).stdout.split()
    view, output, grew = map(int, out)
    assert output == view
    assert grew < output + view // 2, f"peak grew {grew / 2**20:.1f} MiB for a {view / 2**20:.0f} MiB view"


def test_outputs_are_handed_over_without_a_copy():
    # Each output is a NumPy array over memory the kernel wrote, owned by its base object.
    q = rand(1, 2, 8, 16)
    o, lse = attentive.attention(q, q, q, return_lse=True)
    for a in (o, lse):
        assert a.flags.c_contiguous and a.flags.writeable and not a.flags.owndata
        assert type(a.base).__name__ == "HugeBuffer"
    o[...] = 0  # the caller's to change


def test_f16_keys_and_values():
    q = rand(1, 4, 100, 64)
    k, v = rand(1, 2, 300, 64).astype(np.float16), rand(1, 2, 300, 64).astype(np.float16)
    o = attentive.attention(q, k, v)
    o32 = attentive.attention(q, k.astype(np.float32), v.astype(np.float32))
    np.testing.assert_array_equal(o, o32)


def test_patterns_and_block_masks():
    q, k, v = rand(1, 2, 300, 32), rand(1, 2, 300, 32), rand(1, 2, 300, 32)
    pat = "window:64,0+sink:4,32"
    o = attentive.attention(q, k, v, pattern=pat)
    bm = attentive.BlockMask(pat, 300, 300)
    keep = np.array([[bm.visible(i, j) for j in range(300)] for i in range(300)])
    assert keep[200, 1] and not keep[200, 100] and keep[200, 150]
    check_forward(q, k, v, mask=keep)
    np.testing.assert_array_equal(o, attentive.attention(q, k, v, block_mask=bm))
    full, partial, empty = bm.counts()
    assert empty > 0 and full + partial + empty == 5 * 5


def test_probabilities_and_merge():
    q, k, v = rand(2, 2, 40, 16), rand(2, 2, 90, 16), rand(2, 2, 90, 16)
    p = attentive.attention_probabilities(q, k, causal="bottom-right")
    _, _, p64 = ref.attention(q, k, v, causal="bottom-right")
    _, _, p32 = ref.attention(q, k, v, causal="bottom-right", dtype=np.float32)
    ref.rule("p", p, p64, p32)
    o1, l1 = attentive.attention(q, k[:, :, :50], v[:, :, :50], return_lse=True)
    o2, l2 = attentive.attention(q, k[:, :, 50:], v[:, :, 50:], return_lse=True)
    o, lse = attentive.merge(o1, l1, o2, l2)
    o64, lse64, _ = ref.attention(q, k, v)
    o32, lse32, _ = ref.attention(q, k, v, dtype=np.float32)
    ref.rule("merged o", o, o64, o32, factor=4.0)
    ref.rule("merged lse", lse, lse64, lse32, factor=4.0)


def test_sdpa_and_flash_shapes():
    q, k, v = rand(2, 4, 50, 32), rand(2, 2, 70, 32), rand(2, 2, 70, 32)
    o = attentive.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    check_forward(q, k, v, causal="top-left")
    np.testing.assert_array_equal(o, attentive.attention(q, k, v, causal="top-left"))
    # 3-D inputs
    o3 = attentive.scaled_dot_product_attention(q[0], q[0], q[0])
    np.testing.assert_array_equal(o3, attentive.attention(q[:1], q[:1], q[:1])[0])
    # flash-attn: [B, N, H, D], bottom-right causal, output [B, N, H, D] contiguous.
    qf, kf, vf = (np.ascontiguousarray(x.transpose(0, 2, 1, 3)) for x in (q, k, v))
    of, lse, none = attentive.flash_attn_func(qf, kf, vf, causal=True, window_size=(10, -1),
                                              return_attn_probs=True)
    assert none is None and of.shape == (2, 50, 4, 32) and of.flags.c_contiguous
    want, want_lse = attentive.attention(q, k, v, causal="bottom-right", window=(10, -1),
                                         return_lse=True)
    np.testing.assert_array_equal(of, want.transpose(0, 2, 1, 3))
    np.testing.assert_array_equal(lse, want_lse)


def test_dropout_is_reproducible_from_its_seed():
    q = rand(1, 2, 64, 16)
    a = attentive.attention(q, q, q, dropout_p=0.3, seed=5)
    b = attentive.attention(q, q, q, dropout_p=0.3, seed=5)
    c = attentive.attention(q, q, q, dropout_p=0.3, seed=6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("call,kind", [
    (lambda q: attentive.attention(q.astype(np.float64), q, q), TypeError),
    (lambda q: attentive.attention(q.astype(np.int32), q, q), TypeError),
    (lambda q: attentive.attention([[1.0]], q, q), TypeError),
    (lambda q: attentive.attention(q[0], q[0], q[0]), ValueError),
    (lambda q: attentive.attention(q, q[:, :, :, :8], q), ValueError),
    (lambda q: attentive.attention(q, q[:, :3], q[:, :3]), ValueError),
    (lambda q: attentive.attention(q, q, q, scale=float("nan")), ValueError),
    (lambda q: attentive.attention(q, q, q, scale=float("inf")), ValueError),
    (lambda q: attentive.attention(q, q, q, scale=-1.0), ValueError),
    (lambda q: attentive.attention(q, q, q, softcap=0.0), ValueError),
    (lambda q: attentive.attention(q, q, q, dropout_p=1.5), ValueError),
    (lambda q: attentive.attention(q, q, q, causal="left"), ValueError),
    (lambda q: attentive.attention(q, q, q, pattern="window:"), ValueError),
    (lambda q: attentive.attention(q, q, q, attn_mask=np.ones((3, 3), bool)), ValueError),
    (lambda q: attentive.attention(q, q, q, alibi_slopes=[1.0]), ValueError),
    (lambda q: attentive.attention(q, q, q, isa="neon"), ValueError),
    (lambda q: attentive.attention(q, q, q, block_mask=attentive.BlockMask("window:4,0", 5, 5)),
     ValueError),
    (lambda q: attentive.scaled_dot_product_attention(q, q[:, :2], q[:, :2]), ValueError),
    (lambda q: attentive.scaled_dot_product_attention(q, q, q, attn_mask=np.ones((16, 16), bool),
                                                      is_causal=True), ValueError),
    (lambda q: attentive.merge(q, q[..., 0], q[:, :2], q[:, :2, :, 0]), ValueError),
    (lambda q: attentive.BlockMask("nonsense:1", 4, 4), ValueError),
    (lambda q: attentive._attentive.forward(q, q, q, {"scael": 1.0}), ValueError),
    (lambda q: attentive._attentive.forward(q, q, q, {"scale": "big"}), TypeError),
])
def test_bad_input_raises(call, kind):
    q = rand(1, 4, 16, 16)
    with pytest.raises(kind) as e:
        call(q)
    assert str(e.value)
    if kind is ValueError:
        assert isinstance(e.value, attentive.AttentionError) or "attentive" in str(e.value) \
            or "scaled_dot_product_attention" in str(e.value)


def test_the_gil_is_released():
    # With the kernel on one thread (set in conftest.py), two Python threads calling it finish
    # in about the time of one call each, not of two in a row.
    assert attentive.num_threads() == 1
    q = rand(1, 4, 1024, 64)
    attentive.attention(q, q, q)

    def one():
        attentive.attention(q, q, q)

    def timed(threads):
        best = float("inf")
        for _ in range(3):
            ts = [threading.Thread(target=one) for _ in range(threads)]
            t0 = time.perf_counter()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            best = min(best, time.perf_counter() - t0)
        return best

    single, double = timed(1), timed(2)
    assert double < 1.5 * single, f"two threads took {double:.3f} s, one {single:.3f} s"


def test_thread_counts_give_the_same_bits():
    # The first pool a Python thread builds runs on that thread itself; later counts, the shared
    # default (0) and other Python threads each get pools of their own. The kernel's sums do not
    # depend on the thread count, so every one returns the same bits.
    q, k, v = rand(1, 4, 300, 32), rand(1, 4, 300, 32), rand(1, 4, 300, 32)
    want = attentive.attention(q, k, v, causal="top-left")
    got = {}
    try:
        for n in (2, 0, 3, 1, 2):
            attentive.set_num_threads(n)
            assert attentive.num_threads() == n if n else attentive.num_threads() >= 1
            got[n] = attentive.attention(q, k, v, causal="top-left")

        def other():
            got["thread"] = attentive.attention(q, k, v, causal="top-left")

        t = threading.Thread(target=other)
        t.start()
        t.join()
    finally:
        attentive.set_num_threads(1)
    for n, o in got.items():
        np.testing.assert_array_equal(o, want, err_msg=f"threads {n}")
