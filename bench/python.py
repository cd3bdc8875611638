#!/usr/bin/env python3
"""attentive from Python against torch's SDPA, and the same kernel through the CLI.

Run with the Python that has the attentive wheel and torch installed (see the README's Python
section), from a clone with the CLI built (`cargo build --release`):

    python bench/python.py [--rounds 48] [--json out.json]

For each shape it times, alternating in one run on the same arrays: torch's
`scaled_dot_product_attention`, `attentive.scaled_dot_product_attention` on the same tensors,
and `attentive bench --serve` (the kernel alone, no Python). It prints torch / attentive from
Python beside torch / attentive from the CLI (each the median of the ratios within a round):
the Python layer's cost at that shape. The first row, N = 128, gives the per-call overhead: the
Python call's time minus the CLI's.
"""

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

# NumPy's OpenBLAS threads poll for work and take cycles from the kernels on a small machine;
# nothing here calls BLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import attentive  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.join(HERE, "..", "target", "release", "attentive")
THREADS = int(os.environ.get("THREADS", "2"))

# (label, B, Hq, Hkv, N, D, causal, backward)
SHAPES = [
    ("forward N=128 D=64 (overhead)", 1, 8, 8, 128, 64, False, False),
    ("forward N=2048 D=64", 1, 8, 8, 2048, 64, False, False),
    ("forward N=2048 D=128", 1, 8, 8, 2048, 128, False, False),
    ("forward causal N=2048 D=64", 1, 8, 8, 2048, 64, True, False),
    ("fwd+bwd N=2048 D=64", 1, 8, 8, 2048, 64, False, True),
    ("forward GQA 32/8 N=2048 D=128", 1, 32, 8, 2048, 128, False, False),
]


class Cli:
    """`attentive bench --serve` holding one problem's inputs: times the kernel alone."""

    def __init__(self, inputs, causal, backward):
        args = [BIN, "bench", "--inputs", inputs, "--serve"]
        if backward:
            args.append("--backward")
        if causal:
            args += ["--causal", "top-left"]
        env = dict(os.environ, RAYON_NUM_THREADS=str(THREADS))
        self.p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  env=env)

    def run(self):
        self.p.stdin.write("run\n")
        self.p.stdin.flush()
        return float(self.p.stdout.readline())

    def close(self):
        self.p.stdin.close()
        self.p.wait()


def call(fn, q, k, v, d_o, causal, backward, gqa):
    if backward:
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    t = time.perf_counter()
    o = fn(q, k, v, is_causal=causal, enable_gqa=gqa)
    if backward:
        o.backward(d_o)
    return time.perf_counter() - t


def time_shape(label, b, hq, hkv, n, d, causal, backward, rounds):
    rng = np.random.default_rng(len(label))
    arr = {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in
           [("q", (b, hq, n, d)), ("k", (b, hkv, n, d)), ("v", (b, hkv, n, d)), ("do", (b, hq, n, d))]}
    tmp = tempfile.mkdtemp(prefix="attn-py-")
    for name, x in arr.items():
        np.save(os.path.join(tmp, f"{name}.npy"), x)
    # Tensors from torch's allocator (64-byte aligned, as a model's are); NumPy's own arrays
    # start 16 bytes into a cache line.
    q, k, v, d_o = (torch.from_numpy(arr[x]).clone() for x in ("q", "k", "v", "do"))
    gqa = hq != hkv
    cli = Cli(tmp, causal, backward)
    impls = {
        "torch": lambda: call(F.scaled_dot_product_attention, q, k, v, d_o, causal, backward, gqa),
        "python": lambda: call(attentive.scaled_dot_product_attention, q, k, v, d_o, causal,
                               backward, gqa),
        "cli": cli.run,
    }
    first = [min(f() for _ in range(3)) for f in impls.values()]
    reps = max(1, int(0.2 / max(min(first), 1e-6)))
    samples = {name: [] for name in impls}
    orders = list(itertools.permutations(impls))
    for r in range(rounds):
        # Every order in turn, so that each implementation follows each other one equally often
        # (torch's OpenMP threads spin for a while after its calls).
        for name in orders[r % len(orders)]:
            samples[name].append(sum(impls[name]() for _ in range(reps)) / reps)
    cli.close()
    for f in os.listdir(tmp):
        os.remove(os.path.join(tmp, f))
    os.rmdir(tmp)
    med = {name: float(np.median(s)) for name, s in samples.items()}
    # Ratios within each round (the three measured within a second of one another), then their
    # median: the machine's drift over the run cancels in each.
    t, p, c = (np.array(samples[name]) for name in ("torch", "python", "cli"))
    return {
        "label": label, "shape": [b, hq, hkv, n, d], "causal": causal, "backward": backward,
        "reps": reps, "rounds": rounds,
        "median_ms": {name: 1e3 * t for name, t in med.items()},
        "torch_over_python": float(np.median(t / p)),
        "torch_over_cli": float(np.median(t / c)),
        "python_over_cli": float(np.median(p / c)),
        "python_overhead_us": 1e6 * (med["python"] - med["cli"]),
    }


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=48)
    ap.add_argument("--json")
    ap.add_argument("--only", help="run the shapes whose label contains this")
    args = ap.parse_args()
    if not os.path.exists(BIN):
        sys.exit(f"{BIN} not found: run `cargo build --release` first")
    torch.set_num_threads(THREADS)
    attentive.set_num_threads(THREADS)
    print(f"{cpu_model()}; torch {torch.__version__}; {THREADS} threads; medians of "
          f"{args.rounds} rounds, alternating torch, attentive from Python, attentive CLI "
          "(every order in turn)")
    print("| shape | torch ms | attentive (Python) ms | attentive (CLI) ms | torch / Python | "
          "torch / CLI | Python's shortfall | Python − CLI |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for shape in SHAPES:
        if args.only and args.only not in shape[0]:
            continue
        r = time_shape(*shape, args.rounds)
        rows.append(r)
        m = r["median_ms"]
        print(f"| {r['label']} | {m['torch']:.3f} | {m['python']:.3f} | {m['cli']:.3f} | "
              f"{r['torch_over_python']:.3f}× | {r['torch_over_cli']:.3f}× | "
              f"{100 * (1 - r['torch_over_python'] / r['torch_over_cli']):+.1f}% | "
              f"{r['python_overhead_us']:+.0f} µs |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_model(), "torch": torch.__version__, "threads": THREADS,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
