"""The other math and the views from Python: against float64 NumPy oracles by the accuracy rule
where the math is a few lines, against exact attention where a variant must approach it, and
the viz crate's golden values."""

import numpy as np
import pytest

import attentive
import reference as ref
from attentive import variants, viz

RNG = np.random.default_rng(11)


def rand(*shape, scale=1.0):
    return (scale * RNG.standard_normal(shape)).astype(np.float32)


def phi(x):
    return np.where(x > 0, x + 1, np.exp(np.minimum(x, 0)))


def linear_oracle(q, k, v, causal, dtype):
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    fq, fk = phi(q), phi(k)
    a = np.einsum("bhid,bhjd->bhij", fq, fk)
    if causal:
        a = np.tril(a)
    return np.einsum("bhij,bhjd->bhid", a, v) / (a.sum(-1, keepdims=True) + dtype(1e-6))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,d", [(1, 4), (37, 16), (130, 64)])
def test_linear_matches_its_oracle(causal, n, d):
    q, k, v = rand(2, 3, n, d), rand(2, 3, n, d), rand(2, 3, n, d)
    got = variants.linear(q, k, v, causal=causal)
    ref.rule("linear", got, linear_oracle(q, k, v, causal, np.float64),
             linear_oracle(q, k, v, causal, np.float32))


def test_luong_scores_match_their_oracle():
    q, k, v = rand(2, 2, 9, 8), rand(2, 2, 14, 8), rand(2, 2, 14, 5)
    w = rand(8, 8, scale=0.3)
    for score, kw, mat in [("dot", {}, np.eye(8)), ("general", {"w": w}, w)]:
        out, weights = variants.additive(q, k, v, score=score, **kw)
        outs = []
        for dtype in (np.float64, np.float32):
            s = np.einsum("bhid,de,bhje->bhij", q.astype(dtype), mat.astype(dtype), k.astype(dtype))
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            outs.append((np.einsum("bhij,bhjd->bhid", p, v.astype(dtype)), p))
        ref.rule(f"{score} out", out, outs[0][0], outs[1][0])
        ref.rule(f"{score} weights", weights, outs[0][1], outs[1][1])


def test_han_pool_matches_its_oracle():
    h, w, b, c = rand(3, 7, 6), rand(5, 6), rand(5), rand(5)
    s, alpha = variants.han_pool(h, w, b, c)
    res = []
    for dtype in (np.float64, np.float32):
        u = np.tanh(np.einsum("gnd,ad->gna", h.astype(dtype), w.astype(dtype)) + b.astype(dtype))
        e = np.einsum("gna,a->gn", u, c.astype(dtype))
        a = np.exp(e - e.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        res.append((np.einsum("gn,gnd->gd", a, h.astype(dtype)), a))
    ref.rule("han s", s, res[0][0], res[1][0])
    ref.rule("han alpha", alpha, res[0][1], res[1][1])


def test_linformer_with_identity_projection_is_exact_attention():
    n = 40
    q, k, v = rand(1, 2, n, 16), rand(1, 2, n, 16), rand(1, 2, n, 16)
    got = variants.linformer(q, k, v, np.eye(n, dtype=np.float32))
    o64, _, _ = ref.attention(q, k, v)
    o32, _, _ = ref.attention(q, k, v, dtype=np.float32)
    ref.rule("linformer", got, o64, o32, factor=4.0)


def test_adaptive_span_with_the_whole_span_is_causal_attention():
    q, k, v = rand(1, 2, 50, 16), rand(1, 2, 50, 16), rand(1, 2, 50, 16)
    got = variants.adaptive_span(q, k, v, current=[1.0, 1.0], max_span=64, ramp=4)
    o64, _, _ = ref.attention(q, k, v, causal="top-left")
    o32, _, _ = ref.attention(q, k, v, causal="top-left", dtype=np.float32)
    ref.rule("adaptive span", got, o64, o32)
    short = variants.adaptive_span(q, k, v, current=[0.0, 0.0], max_span=64, ramp=1)
    # A span of 0 with a ramp of 1: each query sees only itself.
    np.testing.assert_allclose(short, np.broadcast_to(v, short.shape), atol=1e-6)


def test_estimators_approach_exact_attention():
    # Performer and Nyströmformer estimate softmax attention: on average much closer to it than
    # a uniform average of the values, and Nyström closer with more landmarks.
    q, k, v = rand(1, 2, 64, 16, scale=0.5), rand(1, 2, 64, 16, scale=0.5), rand(1, 2, 64, 16)
    exact, _, _ = ref.attention(q, k, v)
    err = lambda o: np.abs(o - exact).mean()  # noqa: E731
    uniform = err(np.broadcast_to(v.mean(2, keepdims=True), exact.shape))
    perf = variants.performer(q, k, v, num_features=2048, seed=1)
    assert err(perf) < 0.5 * uniform
    nys = [err(variants.nystrom(q, k, v, landmarks=m)) for m in (16, 32, 64)]
    assert nys[0] > nys[1] > nys[2] and nys[2] < 0.25 * uniform, nys
    np.testing.assert_array_equal(perf, variants.performer(q, k, v, num_features=2048, seed=1))


def test_lsh_with_one_bucket_pair_sees_its_chunk_neighbours():
    x, v = rand(1, 2, 128, 16), rand(1, 2, 128, 16)
    a = variants.lsh(x, v, n_buckets=2, bucket_size=32, seed=3)
    assert a.shape == (1, 2, 128, 16) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, variants.lsh(x, v, n_buckets=2, bucket_size=32, seed=3))
    with pytest.raises(ValueError):
        variants.lsh(x, v, n_buckets=3)


def test_gated_with_no_decay_is_causal_linear_without_the_denominator():
    q, k, v = rand(1, 2, 20, 8), rand(1, 2, 20, 8), rand(1, 2, 20, 8)
    got = variants.gated_linear(q, k, v, log_decay=[0.0, 0.0], scale=1.0)
    res = [np.einsum("bhij,bhjd->bhid",
                     np.tril(np.einsum("bhid,bhjd->bhij", q.astype(t), k.astype(t))), v.astype(t))
           for t in (np.float64, np.float32)]
    ref.rule("gated", got, *res)


def test_rollout_golden_values():
    # VARIANTS.md §15: A1 = [[.5,.5],[.2,.8]], A2 = [[1,0],[.3,.7]] give J2 =
    # [[.75,.25],[.1975,.8025]].
    maps = np.array([0.5, 0.5, 0.2, 0.8, 1.0, 0.0, 0.3, 0.7], np.float32).reshape(2, 1, 2, 2)
    j = viz.rollout(maps, ["a", "b"])
    assert j.shape == (2, 2, 2)
    np.testing.assert_allclose(j[1], [[0.75, 0.25], [0.1975, 0.8025]], atol=1e-6)


def test_head_stats_and_views():
    tokens = ["[CLS]", "a", "."]
    prev = np.array([1, 0, 0, 1, 0, 0, 0, 1, 0], np.float32).reshape(1, 1, 3, 3)
    s = viz.head_stats(prev, tokens)[0]
    assert s["entropy"] == 0.0 and s["special"] == pytest.approx(2 / 3)
    assert s["neighbours"] == pytest.approx([2 / 3, 1 / 3, 0.0])
    html, svgs = viz.report(prev, tokens, "prev", svgs=True)
    assert "<svg" in html and "http" not in html and svgs
    svg = viz.heatmap_svg(prev[0, 0], tokens, title="head 0")
    assert svg.startswith("<svg") and "[CLS]" in svg
    with pytest.raises(ValueError):
        viz.rollout(prev, ["too", "few"])
    with pytest.raises(ValueError):
        viz.head_stats(-prev, tokens)


def test_maps_from_the_kernel_feed_the_views():
    q = rand(1, 2, 6, 8)
    p = attentive.attention_probabilities(q, q, causal="top-left")  # [1, 2, 6, 6]
    tokens = [f"t{i}" for i in range(6)]
    stats = viz.head_stats(p, tokens)
    assert len(stats) == 2 and all(s["distance"] is not None for s in stats)
