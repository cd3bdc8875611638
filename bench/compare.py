#!/usr/bin/env python3
"""attentive against the CPU attention a user could pick instead, on this CPU, in one run.

The peers: PyTorch's scaled_dot_product_attention (forward and backward), ONNX Runtime (the
com.microsoft MultiHeadAttention op, whose flash kernel serves non-causal attention without
grouped heads; the ai.onnx Attention op of opset 23 otherwise) and OpenVINO (one
ScaledDotProductAttention node compiled with INFERENCE_PRECISION_HINT=f32). ONNX Runtime and
OpenVINO are forward-only. Every peer runs with 2 threads.

Sets them up from PyPI in a virtual environment of its own (bench/.venv: a large download, done
once and reused; CI never runs this), checks that each imports before timing anything, builds
the `attentive` CLI, and for every shape:

  * draws the inputs once (numpy, seeded) and hands the same arrays to every implementation;
  * times them alternately, torch, ONNX Runtime, OpenVINO, attentive, torch, ...: attentive
    through `attentive bench --inputs DIR --serve` (a process that times one call per `run`
    command), the peers in this process; each sample repeats the call until it lasts about
    0.2 s;
  * checks every implementation's output (and gradients) against an f64 reference by the
    accuracy rule (BENCHMARKS.md, Method): max|out - ref| <= 2x (3x for gradients) max|naive f32 - ref|
    plus a 4-ulp floor of the largest reference value;
  * prints the medians and the ratios (peer time / attentive time: above 1 is faster).

Then peak memory in separate processes (forward+backward, H=1, D=64), the CPU model, the FMA
ceiling and read bandwidth from `attentive peak` before and after, a JSON file of every
figure, and an SVG plot of GFLOP/s and peak memory against N.

Usage: python3 bench/compare.py [--quick] [--only TEXT] [--peers torch,ort,openvino] [--out bench-out]
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VENV = os.path.join(HERE, ".venv")
VPY = os.path.join(VENV, "bin", "python")
THREADS = 2
PACKAGES = ["numpy", "torch", "onnx", "onnxruntime", "openvino"]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="N=2048 (and causal N=4096 D=64), GQA and decode only, 5 rounds, no memory runs")
    ap.add_argument("--only", default="", help="run only the shapes whose label contains this text")
    ap.add_argument("--peers", default="torch,ort,openvino",
                    help="comma-separated peers to time beside attentive (torch, ort, openvino)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench-out"), help="directory for the JSON and SVG")
    args = ap.parse_args()
    unknown = {p for p in args.peers.split(",") if p} - {"torch", "ort", "openvino"}
    if unknown:
        ap.error(f"unknown peers {sorted(unknown)} (torch, ort, openvino)")
    return args


def preflight():
    """Everything but the peers, checked before anything is downloaded: the arguments, cargo,
    the attentive CLI (built here), its ceiling probe, Python's venv and pip, and the disk room
    the peers need."""
    parse_args()
    if not shutil.which("cargo"):
        sys.exit("compare.py: cargo is not on PATH (install Rust 1.89 or later: https://rustup.rs)")
    subprocess.check_call(["cargo", "build", "--release", "-q", "-p", "attentive-cli"], cwd=ROOT)
    subprocess.check_call([os.path.join(ROOT, "target", "release", "attentive"), "peak", "--read-mib", "16"],
                          stdout=subprocess.DEVNULL)
    if not os.path.exists(VPY):
        for module in ("venv", "ensurepip"):
            if subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode:
                sys.exit(f"compare.py: this Python lacks the '{module}' module "
                         "(on Debian and Ubuntu: apt install python3-venv)")
        free = shutil.disk_usage(HERE).free / 2**30
        if free < 8:
            sys.exit(f"compare.py: the peers need about 8 GiB in {HERE}; {free:.1f} GiB are free")


def ensure_venv():
    """Re-executes this script with the venv's Python, creating the venv on first use."""
    if os.path.realpath(sys.prefix) == os.path.realpath(VENV):
        return
    preflight()
    if not os.path.exists(VPY):
        print("creating bench/.venv and installing the peers from PyPI (once) ...", flush=True)
        subprocess.check_call([sys.executable, "-m", "venv", VENV])
    # Installs whatever is missing (a venv made for an earlier version of this script has only
    # torch), then checks that everything imports before a single shape is timed.
    missing = subprocess.run([VPY, "-c", "import numpy, torch, onnx, onnxruntime, openvino"],
                             capture_output=True).returncode != 0
    if missing:
        subprocess.check_call([VPY, "-m", "pip", "install", "-q", *PACKAGES])
        subprocess.check_call([VPY, "-c", "import numpy, torch, onnx, onnxruntime, openvino"])
    os.execv(VPY, [VPY] + sys.argv)


ensure_venv()
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import onnxruntime as ort  # noqa: E402
import openvino as ov  # noqa: E402
import openvino.opset13 as ov_ops  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

torch.set_num_threads(THREADS)
BIN = os.path.join(ROOT, "target", "release", "attentive")


def peak():
    out = subprocess.check_output([BIN, "peak", "--threads", str(THREADS)])
    return json.loads(out)


class Attentive:
    """An `attentive bench --serve` process holding one problem's inputs."""

    name = "attentive"
    op = "attentive::forward (and backward)"

    def __init__(self, inputs, backward, causal):
        args = [BIN, "bench", "--inputs", inputs, "--serve"]
        if backward:
            args.append("--backward")
        if causal:
            args += ["--causal", "top-left"]
        env = dict(os.environ, RAYON_NUM_THREADS=str(THREADS))
        # The kv-head count comes from k.npy's shape.
        self.p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, line):
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        reply = self.p.stdout.readline()
        if not reply:
            raise RuntimeError(f"attentive exited (command {line!r})")
        return reply.strip()

    def run(self):
        return float(self.ask("run"))

    def save(self, d):
        self.ask(f"save {d}")

    def close(self):
        self.p.stdin.close()
        self.p.wait()


def torch_call(q, k, v, d_o, causal, backward, gqa, naive=False):
    """One call of torch's fused kernel (or the naive composition), timed."""
    if backward:
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    t = time.perf_counter()
    if naive:
        o = naive_attention(q, k, v, causal)
    else:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    if backward:
        o.backward(d_o)
    return time.perf_counter() - t, o, (q, k, v)


def ort_session(nodes, inputs, output, opsets):
    """An ONNX Runtime CPU session of one graph, with 2 intra-op threads."""
    graph = helper.make_graph(nodes, "attention", inputs, [output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


class OnnxRuntime:
    """ONNX Runtime, forward only: com.microsoft MultiHeadAttention ([B, N, H·D], its flash
    kernel) for non-causal attention with as many key as query heads; otherwise the ai.onnx
    Attention op of opset 23 ([B, H, N, D], grouped heads and is_causal)."""

    name = "onnxruntime"

    def __init__(self, arr, causal, gqa):
        q, k, v = arr["q"], arr["k"], arr["v"]
        (b, hq, nq, d), (_, hkv, nk, _) = q.shape, k.shape
        f = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))
        if not causal and hq == hkv:
            self.op = "com.microsoft MultiHeadAttention"
            to3 = lambda x: np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1))
            self.feeds = {"q": to3(q), "k": to3(k), "v": to3(v)}
            node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft",
                                    num_heads=hq)
            self.sess = ort_session([node], [f(n, x.shape) for n, x in self.feeds.items()],
                                    f("o", (b, nq, hq * d)), [("", 23), ("com.microsoft", 1)])
            self.unpack = lambda o: o.reshape(b, nq, hq, d).transpose(0, 2, 1, 3)
        else:
            self.op = "ai.onnx Attention (opset 23)"
            self.feeds = {"q": q, "k": k, "v": v}
            node = helper.make_node("Attention", ["q", "k", "v"], ["o"], is_causal=int(causal))
            self.sess = ort_session([node], [f(n, x.shape) for n, x in self.feeds.items()],
                                    f("o", (b, hq, nq, d)), [("", 23)])
            self.unpack = lambda o: o

    def run(self):
        t = time.perf_counter()
        self.out = self.sess.run(None, self.feeds)[0]
        return time.perf_counter() - t

    def outputs(self):
        return {"o": np.ascontiguousarray(self.unpack(self.out))}


class OpenVino:
    """OpenVINO, forward only: one opset13 ScaledDotProductAttention node, compiled for the CPU
    in f32 (its default on CPUs with bf16 support is bf16) with 2 threads. Grouped heads (not
    causal) as a broadcast: the queries of a key head's group are one longer sequence."""

    name = "openvino"

    def __init__(self, arr, causal, gqa):
        q, k, v = arr["q"], arr["k"], arr["v"]
        (b, hq, nq, d), (_, hkv, nk, _) = q.shape, k.shape
        if hq != hkv and causal:
            raise ValueError("grouped heads with a causal mask are not expressed for OpenVINO here")
        self.op = "opset13 ScaledDotProductAttention"
        qg = q.reshape(b, hkv, hq // hkv * nq, d)
        params = [ov_ops.parameter(list(x.shape), np.float32) for x in (qg, k, v)]
        node = ov_ops.scaled_dot_product_attention(*params, causal=causal)
        cfg = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": str(THREADS)}
        self.req = ov.Core().compile_model(ov.Model([node], params), "CPU", cfg).create_infer_request()
        self.inputs = [qg, k, v]
        self.shape = (b, hq, nq, d)

    def run(self):
        t = time.perf_counter()
        self.req.infer(self.inputs, share_inputs=True)
        return time.perf_counter() - t

    def outputs(self):
        return {"o": self.req.get_output_tensor(0).data.reshape(self.shape).copy()}


class Torch:
    """torch's fused scaled_dot_product_attention, forward and backward."""

    name = "torch"

    def __init__(self, arr, causal, backward, gqa):
        self.args = [torch.from_numpy(arr[n]) for n in ("q", "k", "v", "do")] + [causal, backward, gqa]
        self.backward = backward
        self.op = "scaled_dot_product_attention"

    def run(self):
        t, self.o, self.grads = torch_call(*self.args)
        return t

    def outputs(self):
        out = {"o": self.o.detach().numpy()}
        if self.backward:
            q, k, v = self.grads
            out.update(dq=q.grad.numpy(), dk=k.grad.numpy(), dv=v.grad.numpy())
        return out


def naive_attention(q, k, v, causal):
    """softmax(Q Kᵀ / sqrt(D)) V materialised, in the inputs' dtype (torch's unfused path)."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        n, m = s.shape[-2:]
        s = s.masked_fill(torch.ones(n, m, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v


def accuracy(ours, q, k, v, d_o, causal, backward, heads):
    """Ratios err(ours) / (factor * err(naive f32) + floor) per output; <= 1 passes."""
    res = {}
    names = ["o"] + (["dq", "dk", "dv"] if backward else [])
    hkv = k.shape[1]
    rep = q.shape[1] // hkv
    for h in heads:
        kh = h // rep
        sl = (slice(None), slice(h, h + 1))
        slk = (slice(None), slice(kh, kh + 1))
        outs = {}
        for dtype in (torch.float64, torch.float32):
            qq, kk, vv = (x.to(dtype).detach().requires_grad_(backward) for x in (q[sl], k[slk], v[slk]))
            o = naive_attention(qq, kk, vv, causal)
            got = {"o": o.detach()}
            if backward:
                o.backward(d_o[sl].to(dtype))
                got.update(dq=qq.grad, dk=kk.grad, dv=vv.grad)
            outs[dtype] = got
        for name in names:
            if name in ("dk", "dv") and rep > 1:
                continue  # a kv head's gradient sums its group: checked only without GQA
            ref = outs[torch.float64][name]
            naive = outs[torch.float32][name].double()
            hh = h if name in ("o", "dq") else kh
            mine = torch.from_numpy(ours[name][:, hh:hh + 1]).double()
            floor = 4 * float(np.spacing(np.float32(ref.abs().max().item())))
            factor = 2.0 if name == "o" else 3.0
            err = (mine - ref).abs().max().item()
            allowed = factor * (naive - ref).abs().max().item() + floor
            res[name] = max(res.get(name, 0.0), err / allowed)
    return res


def time_shape(label, shape, causal, backward, gqa, rounds, with_naive, check_heads, peer_names):
    b, hq, hkv, nq, nk, d = shape
    rng = np.random.default_rng(zlib.crc32(label.encode()))
    arr = {
        "q": rng.standard_normal((b, hq, nq, d), dtype=np.float32),
        "k": rng.standard_normal((b, hkv, nk, d), dtype=np.float32),
        "v": rng.standard_normal((b, hkv, nk, d), dtype=np.float32),
        "do": rng.standard_normal((b, hq, nq, d), dtype=np.float32),
    }
    tmp = tempfile.mkdtemp(prefix="attn-cmp-")
    for name, x in arr.items():
        np.save(os.path.join(tmp, f"{name}.npy"), x)
    q, k, v, d_o = (torch.from_numpy(arr[n]) for n in ("q", "k", "v", "do"))
    peers = []
    for name in peer_names:
        if name == "torch":
            peers.append(Torch(arr, causal, backward, gqa))
        elif not backward:  # ONNX Runtime and OpenVINO have no backward on the CPU
            try:
                peers.append(OnnxRuntime(arr, causal, gqa) if name == "ort" else OpenVino(arr, causal, gqa))
            except ValueError as e:
                print(f"  ({name} skipped: {e})", flush=True)
    ours = Attentive(tmp, backward, causal)
    impls = peers + [ours]
    # Warm up each, and size each sample to about 0.2 s of the fastest.
    first = [min(p.run() for _ in range(2)) for p in impls]
    reps = max(1, math.ceil(0.2 / max(min(first), 1e-6)))
    if with_naive:
        torch_call(q, k, v, d_o, causal, backward, gqa, naive=True)
    samples = {p.name: [] for p in impls}
    if with_naive:
        samples["torch_naive"] = []
    for _ in range(rounds):
        for p in impls:
            samples[p.name].append(sum(p.run() for _ in range(reps)) / reps)
        if with_naive:
            samples["torch_naive"].append(
                sum(torch_call(q, k, v, d_o, causal, backward, gqa, naive=True)[0] for _ in range(reps)) / reps
            )
    ours.save(tmp)
    ours.close()
    names = ["o", "dq", "dk", "dv"] if backward else ["o"]
    outputs = {"attentive": {n: np.load(os.path.join(tmp, f"{n}.npy")) for n in names}}
    outputs.update({p.name: p.outputs() for p in peers})
    acc = {name: accuracy(out, q, k, v, d_o, causal, backward, check_heads(hq)) for name, out in outputs.items()}
    for f in os.listdir(tmp):
        os.remove(os.path.join(tmp, f))
    os.rmdir(tmp)
    pairs = b * hq * (nq * (nq + 1) // 2 if causal else nq * nk)
    flops = pairs * d * (14 if backward else 4)
    med = {k_: float(np.median(v_)) for k_, v_ in samples.items() if v_}
    ratios = {p.name: med[p.name] / med["attentive"] for p in peers}
    fastest = min(ratios, key=ratios.get) if ratios else None
    row = {
        "label": label, "batch": b, "heads": hq, "kv_heads": hkv, "nq": nq, "nk": nk, "dim": d,
        "causal": causal, "backward": backward, "rounds": rounds, "reps": reps,
        "ops": {p.name: p.op for p in impls},
        "samples_ms": {k_: [1e3 * x for x in v_] for k_, v_ in samples.items()},
        "median_ms": {k_: 1e3 * v_ for k_, v_ in med.items()},
        "gflops": {k_: flops / v_ / 1e9 for k_, v_ in med.items()},
        "bytes_kv": 2 * b * hkv * nk * d * 4,
        "ratio": ratios,
        "fastest_peer": fastest,
        "ratio_to_fastest": ratios[fastest] if fastest else None,
        "accuracy": acc,
        "accurate": all(x <= 1.0 for x in acc["attentive"].values()),
    }
    return row


def memory(n, torch_side):
    """Peak RSS of one forward+backward at B=1, H=1, N=n, D=64 in a fresh process."""
    if not torch_side:
        out = subprocess.check_output(
            [BIN, "bench", "--heads", "1", "--seq", str(n), "--dim", "64", "--backward", "--iters", "1", "--json"],
            env=dict(os.environ, RAYON_NUM_THREADS=str(THREADS)), text=True)
        j = json.loads(out.strip().splitlines()[-1])
        return {"peak_rss_mb": j["peak_rss_mb"], "extra_rss_mb": j["extra_rss_mb"]}
    code = f"""
import torch, json, torch.nn.functional as F
torch.set_num_threads({THREADS})
def rss(field):
    for line in open('/proc/self/status'):
        if line.startswith(field): return int(line.split()[1]) * 1024
q, k, v, do = (torch.randn(1, 1, {n}, 64) for _ in range(4))
q.requires_grad_(); k.requires_grad_(); v.requires_grad_()
base = rss('VmRSS:')
o = F.scaled_dot_product_attention(q, k, v)
o.backward(do)
peak = rss('VmHWM:')
outputs = 4 * {n} * 64 * 4
print(json.dumps({{"peak_rss_mb": peak / 2**20, "extra_rss_mb": (peak - base - outputs) / 2**20}}))
"""
    out = subprocess.check_output([VPY, "-c", code], text=True)
    return json.loads(out.strip().splitlines()[-1])


def svg_plot(rows, mem, ceiling, path):
    """GFLOP/s against N (forward, D=64, not causal) and peak RSS against N, as one SVG."""
    fwd = [r for r in rows if r["dim"] == 64 and not r["causal"] and not r["backward"] and r["heads"] == 8]
    fwd.sort(key=lambda r: r["nq"])
    w, h, pad = 440, 300, 55
    colors = {"attentive": "#1b6ac9", "torch": "#d9480f", "onnxruntime": "#2b8a3e", "openvino": "#7048e8",
              "torch_naive": "#868e96"}
    names = {"attentive": "attentive", "torch": "torch SDPA (fused)", "onnxruntime": "ONNX Runtime",
             "openvino": "OpenVINO", "torch_naive": "torch naive"}

    def panel(x0, title, xs, series, ymax, ylabel, hline=None):
        out = [f'<g transform="translate({x0},0)">',
               f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>']
        lx = [math.log2(x) for x in xs]
        fx = lambda x: pad + (math.log2(x) - lx[0]) / max(lx[-1] - lx[0], 1e-9) * (w - 2 * pad)
        fy = lambda y: h - pad + 10 - y / ymax * (h - 2 * pad)
        out.append(f'<line x1="{pad}" y1="{fy(0)}" x2="{w - pad}" y2="{fy(0)}" stroke="black"/>')
        out.append(f'<line x1="{pad}" y1="{fy(0)}" x2="{pad}" y2="{fy(ymax)}" stroke="black"/>')
        for t in range(0, 6):
            y = ymax * t / 5
            out.append(f'<text x="{pad - 5}" y="{fy(y) + 4}" text-anchor="end" font-size="10">{y:.0f}</text>')
        for x in xs:
            out.append(f'<text x="{fx(x)}" y="{fy(0) + 15}" text-anchor="middle" font-size="10">{x}</text>')
        out.append(f'<text x="{w / 2}" y="{h - 8}" text-anchor="middle" font-size="11">N</text>')
        out.append(f'<text x="12" y="{h / 2}" font-size="11" transform="rotate(-90 12 {h / 2})" text-anchor="middle">{ylabel}</text>')
        if hline:
            y, label = hline
            out.append(f'<line x1="{pad}" y1="{fy(y)}" x2="{w - pad}" y2="{fy(y)}" stroke="black" stroke-dasharray="4 3"/>')
            out.append(f'<text x="{w - pad}" y="{fy(y) - 4}" text-anchor="end" font-size="10">{label}</text>')
        for i, (key, ys) in enumerate(series.items()):
            pts = " ".join(f"{fx(x)},{fy(y)}" for x, y in zip(xs, ys) if y is not None)
            out.append(f'<polyline points="{pts}" fill="none" stroke="{colors[key]}" stroke-width="2"/>')
            for x, y in zip(xs, ys):
                if y is not None:
                    out.append(f'<circle cx="{fx(x)}" cy="{fy(y)}" r="3" fill="{colors[key]}"/>')
            out.append(f'<text x="{pad + 10}" y="{40 + 14 * i}" font-size="11" fill="{colors[key]}">{names[key]}</text>')
        out.append("</g>")
        return out

    body = []
    if fwd:
        xs = [r["nq"] for r in fwd]
        keys = [k for k in colors if any(k in r["gflops"] for r in fwd)]
        series = {k: [r["gflops"].get(k) for r in fwd] for k in keys}
        body += panel(0, "forward, B=1, H=8, D=64, fp32, 2 threads", xs, series, ceiling * 1.35, "GFLOP/s",
                      (ceiling, f"FMA ceiling {ceiling:.0f}"))
    if mem:
        xs = sorted(mem)
        series = {"attentive": [mem[n]["attentive"]["peak_rss_mb"] for n in xs],
                  "torch": [mem[n]["torch"]["peak_rss_mb"] for n in xs]}
        top = max(max(s) for s in series.values()) * 1.15
        body += panel(w + 20, "peak RSS, forward+backward, H=1, D=64", xs, series, top, "MB")
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * w + 20}" height="{h}" font-family="sans-serif">',
           '<rect width="100%" height="100%" fill="white"/>'] + body + ["</svg>"]
    with open(path, "w") as f:
        f.write("\n".join(svg) + "\n")


def cpu_model():
    """The CPU's model name, vendor and family/model numbers, as the kernel reports them."""
    info = {}
    for line in open("/proc/cpuinfo"):
        key, _, val = line.partition(":")
        key = key.strip()
        if key in ("model name", "vendor_id", "cpu family", "model") and key not in info:
            info[key] = val.strip()
        if not line.strip() and info:
            break
    return (f"{info.get('model name', '?')} ({info.get('vendor_id', '?')}, family {info.get('cpu family', '?')} "
            f"model {info.get('model', '?')}), {os.cpu_count()} logical CPUs")


def main():
    args = parse_args()
    peer_names = [p for p in args.peers.split(",") if p]
    os.makedirs(args.out, exist_ok=True)
    subprocess.check_call(["cargo", "build", "--release", "-q", "-p", "attentive-cli"], cwd=ROOT)
    cpu = cpu_model()
    before = peak()
    print(f"CPU: {cpu}", flush=True)
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, openvino {ov.__version__}, {THREADS} threads; "
          f"ceiling before: {before}", flush=True)
    ns = [2048] if args.quick else [512, 2048, 8192]
    rounds = lambda n: 5 if args.quick or n >= 8192 else 7
    few_heads = lambda h: [0, h - 1]
    all_heads = lambda h: list(range(h))
    plan = []
    for backward in (False, True):
        for d in (64, 128):
            for n in ns + ([4096] if args.quick and d == 64 and not backward else []):
                for causal in (False, True) if n != 4096 else (True,):
                    mode = "fwd+bwd" if backward else "forward"
                    label = f"{mode} H=8 N={n} D={d}{' causal' if causal else ''}"
                    plan.append((label, (1, 8, 8, n, n, d), causal, backward, False,
                                 rounds(n), d == 64 and not causal and not backward,
                                 few_heads if n >= 4096 else all_heads))
    for backward in (False, True):
        mode = "fwd+bwd" if backward else "forward"
        plan.append((f"{mode} GQA Hq=32 Hkv=8 N=2048 D=128", (1, 32, 8, 2048, 2048, 128), False, backward, True,
                     rounds(2048), False, few_heads))
    plan.append(("decode 1 query, H=32, 32768 keys, D=128", (1, 32, 32, 1, 32768, 128), False, False, False,
                 15, False, all_heads))
    rows = []
    cols = [p for p in ("torch", "onnxruntime", "openvino") if p.replace("onnxruntime", "ort") in peer_names]
    print("| shape | " + " | ".join(f"{c} ms" for c in cols) + " | attentive ms | attentive GFLOP/s | "
          "fastest peer / attentive | attentive / torch | error / allowed: attentive | peers |", flush=True)
    print("|---" * (len(cols) + 7) + "|", flush=True)
    for item in [p for p in plan if args.only in p[0]]:
        r = time_shape(*item, peer_names)
        rows.append(r)
        ms = lambda c: f"{r['median_ms'][c]:.2f}" if c in r["median_ms"] else "—"
        acc = lambda c: f"{max(r['accuracy'][c].values()):.2f}"
        fastest = f"{r['ratio_to_fastest']:.2f}x ({r['fastest_peer']})" if r["fastest_peer"] else "—"
        vs_torch = f"{r['ratio']['torch']:.2f}x" if "torch" in r["ratio"] else "—"
        print(f"| {r['label']} | " + " | ".join(ms(c) for c in cols) + f" | {ms('attentive')} | "
              f"{r['gflops']['attentive']:.1f} | {fastest} | {vs_torch} | "
              f"{acc('attentive')}{'' if r['accurate'] else ' FAIL'} | "
              + ", ".join(f"{c} {acc(c)}" for c in r["accuracy"] if c != "attentive") + " |", flush=True)
    mem = {}
    if not args.quick and "torch" in peer_names:
        for n in (4096, 16384, 65536):
            mem[n] = {"attentive": memory(n, False), "torch": memory(n, True)}
            print(f"memory N={n}: attentive {mem[n]['attentive']}, torch {mem[n]['torch']}", flush=True)
    after = peak()
    # The higher of the two measurements: on a shared machine the lower one would flatter the kernel.
    ceiling = max(before["fma_gflops"], after["fma_gflops"])
    bandwidth = max(before["read_gbps"], after["read_gbps"])
    print(f"ceiling after: {after}")
    for r in rows:
        if r["nq"] == 1:
            gbps = r["bytes_kv"] / (r["median_ms"]["attentive"] / 1e3) / 1e9
            r["attentive_read_gbps"] = gbps
            print(f"decode: attentive reads K and V at {gbps:.1f} GB/s = {100 * gbps / bandwidth:.0f}% of "
                  f"the measured {bandwidth:.1f} GB/s")
        else:
            r["efficiency"] = r["gflops"]["attentive"] / ceiling
            print(f"{r['label']}: attentive {r['gflops']['attentive']:.1f} GFLOP/s = "
                  f"{100 * r['efficiency']:.1f}% of the {ceiling:.1f} GFLOP/s ceiling")
    result = {"cpu": cpu, "torch": torch.__version__, "onnxruntime": ort.__version__, "openvino": ov.__version__,
              "threads": THREADS, "peak_before": before, "peak_after": after,
              "rows": rows, "memory": {str(n): m for n, m in mem.items()}}
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump(result, f, indent=1)
    svg_plot(rows, mem, ceiling, os.path.join(args.out, "compare.svg"))
    print(f"wrote {args.out}/compare.json and compare.svg")


if __name__ == "__main__":
    main()
