"""Ring attention on loopback: `mpiexec -n P attentive attend --ring` for P = 1, 2, 4 against the
single-process `attend` on the same files, alternating in every round, with each rank's time
computing and waiting for transfers (`--ring-timings`) and its peak memory (GNU time).

    cargo build --release --features mpi
    python3 bench/ring.py              # causal forward+backward, N = 16384, D = 64 and 128
    python3 bench/ring.py --bandwidth  # the ring's transfer rate: big blocks, almost no compute
    python3 bench/ring.py --memory     # peak memory per rank at N = 262144, D = 64, P = 4

Every process of a run shares this machine's cores: each rank gets cores / P threads (at least
one), so P above the core count oversubscribes them. Standard library only.
"""

import json
import os
import random
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "attentive")


def save(path, shape, seed):
    """A float32 .npy of `shape`: a million values uniform in [-1, 1), repeated."""
    rng = random.Random(seed)
    pool = struct.pack("<%df" % (1 << 20), *(rng.uniform(-1, 1) for _ in range(1 << 20)))
    n = 1
    for s in shape:
        n *= s
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (%s), }" % ", ".join(map(str, shape))
    header += " " * (63 - (10 + len(header)) % 64) + "\n"
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode())
        left = 4 * n
        while left:
            f.write(pool[:min(left, len(pool))])
            left -= min(left, len(pool))


def cpu_model():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def run(ranks, args, ring):
    """One job: wall seconds, each rank's (computing s, waiting s) and peak RSS in MB."""
    threads = max(1, os.cpu_count() // ranks)
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    timed = ["/usr/bin/time", "-f", "peak_rss_kb %M", BIN, "attend"] + args
    if ring:
        cmd = ["mpiexec", "-n", str(ranks)] + timed + ["--ring", "--ring-timings"]
    else:
        cmd = timed
    t = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    times = [(float(a), float(b)) for a, b in
             re.findall(r"([0-9.]+) s computing, ([0-9.]+) s waiting", out.stderr)]
    rss = [int(x) / 1024 for x in re.findall(r"peak_rss_kb (\d+)", out.stderr)]
    return wall, times, rss


def args(d, causal, grads):
    a = ["--q", f"{d}/q.npy", "--k", f"{d}/k.npy", "--v", f"{d}/v.npy", "--out", f"{d}/o.npy",
         "--lse", f"{d}/lse.npy"]
    if causal:
        a += ["--causal", "top-left"]
    if grads:
        a += ["--grad-out", f"{d}/g.npy", "--dq", f"{d}/dq.npy", "--dk", f"{d}/dk.npy",
              "--dv", f"{d}/dv.npy"]
    return a


def compare(d, shape_q, shape_k, causal, grads, rounds, ranks_list):
    """Alternates the single process and each P, `rounds` times; medians per configuration."""
    save(f"{d}/q.npy", shape_q, 1)
    save(f"{d}/k.npy", shape_k, 2)
    save(f"{d}/v.npy", shape_k, 3)
    if grads:
        save(f"{d}/g.npy", shape_q, 4)
    a = args(d, causal, grads)
    configs = [("attend", 1, False)] + [(f"ring P={p}", p, True) for p in ranks_list]
    got = {c[0]: [] for c in configs}
    for r in range(rounds):
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        for name, p, ring in order:
            got[name].append(run(p, a, ring))
    rows = []
    base = statistics.median(w for w, _, _ in got["attend"])
    for name, p, ring in configs:
        walls = [w for w, _, _ in got[name]]
        wall = statistics.median(walls)
        work = [sum(t[0] for t in ts) / max(1, len(ts)) for _, ts, _ in got[name] if ts]
        wait = [sum(t[1] for t in ts) / max(1, len(ts)) for _, ts, _ in got[name] if ts]
        share = [w / (c + w) for c, w in zip(work, wait) if c + w > 0]
        rss = max(max(x) for _, _, x in got[name])
        rows.append({
            "config": name, "ranks": p, "wall_s": round(wall, 3),
            "vs_attend": round(base / wall, 3),
            "rank_computing_s": round(statistics.median(work), 3) if work else None,
            "rank_waiting_s": round(statistics.median(wait), 3) if wait else None,
            "waiting_share": round(statistics.median(share), 4) if share else None,
            "peak_rss_mb_per_rank": round(rss, 1),
        })
    return rows


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if not os.path.exists(BIN):
        sys.exit("build first: cargo build --release --features mpi")
    print(json.dumps({"cpu": cpu_model(), "cores": os.cpu_count()}))
    with tempfile.TemporaryDirectory() as d:
        if mode == "--memory":
            n = 262144
            for row in compare(d, [1, 1, n, 64], [1, 1, n, 64], True, False, 1, [4]):
                print(json.dumps(row))
            return
        if mode == "--bandwidth":
            # One query row per rank against 4 × 262144 keys: each step moves a block of
            # 4 · 65536 rows · 64 · 2 · 4 bytes = 128 MiB and computes next to nothing.
            p, nk, h = 4, 262144, 4
            save(f"{d}/q.npy", [1, h, p, 64], 1)
            save(f"{d}/k.npy", [1, h, nk, 64], 2)
            save(f"{d}/v.npy", [1, h, nk, 64], 3)
            block = h * (nk // p) * 64 * 2 * 4
            for r in range(3):
                wall, times, _ = run(p, args(d, False, False), True)
                wait = statistics.median(t[1] for t in times)
                comp = statistics.median(t[0] for t in times)
                # P − 1 rounds carry a block; the agreements' rounds carry a few bytes.
                rate = (p - 1) * block / max(wait + comp, 1e-9) / 1e9
                print(json.dumps({"round": r, "ranks": p, "block_mib": block / 2**20,
                                  "wall_s": round(wall, 3), "rank_computing_s": round(comp, 4),
                                  "rank_waiting_s": round(wait, 4),
                                  "transfer_gb_per_s": round(rate, 2)}))
            return
        for dim in (64, 128):
            n, h = 16384, 4
            print(f"# causal forward+backward B=1 H={h} N={n} D={dim}")
            for row in compare(d, [1, h, n, dim], [1, h, n, dim], True, True, 3, [1, 2, 4]):
                print(json.dumps(row))


if __name__ == "__main__":
    main()
