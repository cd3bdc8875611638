#!/bin/sh
# The variants against exact attention: for each length N, every variant and the exact fused
# kernel (causal and not) timed in their own processes (so each peak memory is its own),
# alternating over rounds, forward and forward+backward, B = 1, H = 8, D = 64, 2 threads.
# Prints a table (median over rounds of each call's median, its ratio to exact attention of the
# same causality, peak memory beyond the inputs, and up to N = 16 384 the output's relative
# Frobenius distance from exact softmax attention on the same inputs) and writes every measurement to
# bench-out/variants.jsonl, with the plot bench-out/variants.svg (time and memory against N,
# log-log) and where each variant first beats exact attention. lsh's distance is from its own
# one-chunk form (shared QK, normalised keys), not from softmax attention of q over k. The CPU
# model and the FMA ceiling measured in the same run head it.
# Usage: sh bench/variants.sh [N ...]   (default 1024 4096 16384 65536; 65536 forward only)
set -e
cd "$(dirname "$0")/.."
cargo build --release -q -p attentive-cli
bin=./target/release/attentive
lengths=${*:-1024 4096 16384 65536}
rounds=2
mkdir -p bench-out
out=bench-out/variants.jsonl
: > "$out"
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
echo "ceiling: $($bin peak --threads 2 --read-mib 64)"
# label | flags (non-causal variants have no causal row)
configs="exact|
exact causal|--causal top-left
linear|--variant linear
linear causal|--variant linear --causal top-left
gla causal|--variant gla --causal top-left
performer|--variant performer
performer causal|--variant performer --causal top-left
nystrom|--variant nystrom --landmarks 64
linformer|--variant linformer
lsh|--variant lsh
lsh causal|--variant lsh --causal top-left
adaptive-span causal|--variant adaptive-span --causal top-left"
for n in $lengths; do
    for mode in forward backward; do
        [ "$n" -ge 65536 ] && [ "$mode" = backward ] && continue
        extra=""; [ "$mode" = backward ] && extra="--backward"
        iters=""; [ "$n" -ge 16384 ] && iters="--iters 2"
        r=1
        while [ $r -le $rounds ]; do
            # Alternate the order between rounds.
            list=$(echo "$configs" | if [ $((r % 2)) -eq 0 ]; then tac; else cat; fi)
            echo "$list" | while IFS='|' read -r label flags; do
                json=$($bin bench --json --heads 8 --seq "$n" --dim 64 $iters $extra $flags | tail -n 1)
                echo "{\"label\":\"$label\",\"n\":$n,\"mode\":\"$mode\",\"round\":$r,\"result\":$json}" >> "$out"
            done
            r=$((r + 1))
        done
    done
done
python3 - "$out" <<'EOF'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {}
for r in rows:
    by.setdefault((r["n"], r["mode"], r["label"]), []).append(r["result"])
print("| N | pass | attention | median ms | speed-up over exact (same causality) | extra MB | relative distance from softmax |")
print("|---|---|---|---|---|---|---|")
for (n, mode, label), rs in sorted(by.items(), key=lambda x: (x[0][0], x[0][1])):
    ms = statistics.median(r["median_ms"] for r in rs)
    mb = max(r["extra_rss_mb"] for r in rs)
    causal = "causal" in label
    ref = by.get((n, mode, "exact causal" if causal else "exact"))
    ratio = statistics.median(r["median_ms"] for r in ref) / ms if ref else float("nan")
    err = rs[0].get("error_vs_softmax")
    dist = "–" if err is None else f"{err:.3f}"
    print(f"| {n} | {mode} | {label} | {ms:.1f} | {ratio:.2f} | {mb:.0f} | {dist} |")

# Where each variant first runs faster than exact attention of the same causality.
print()
labels = sorted({l for (_, _, l) in by if not l.startswith("exact")})
for mode in ("forward", "backward"):
    for label in labels:
        ref = "exact causal" if "causal" in label else "exact"
        ns = sorted(n for (n, m, l) in by if m == mode and l == label and (n, m, ref) in by)
        med = lambda k: statistics.median(r["median_ms"] for r in by[k])
        faster = [n for n in ns if med((n, mode, label)) < med((n, mode, ref))]
        where = ("at every N measured" if faster and faster[0] == ns[0] else
                 f"from N = {faster[0]}" if faster else f"not up to N = {ns[-1]}" if ns else "–")
        print(f"- {mode}, {label}: faster than {ref} {where}")

# The plot: median time and extra memory against N, log-log, one line per configuration.
colours = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf", "#000000", "#aec7e8", "#98df8a"]
import math
all_labels = sorted({l for (_, _, l) in by}, key=lambda l: (not l.startswith("exact"), l))
panels = [("forward", "median_ms", "forward time (ms)"),
          ("backward", "median_ms", "forward + backward time (ms)"),
          ("forward", "extra_rss_mb", "forward memory beyond the inputs (MB)")]
W, H, L, T = 380, 300, 60, 30
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{len(panels) * W + 180}" height="{H + 70}" font-family="sans-serif" font-size="11">']
for p, (mode, key, title) in enumerate(panels):
    pts = {l: sorted((n, max(1e-3, statistics.median(r[key] for r in by[(n, m, l)])))
                     for (n, m, ll) in by if m == mode and ll == l) for l in all_labels}
    xs = [n for v in pts.values() for n, _ in v]
    ys = [y for v in pts.values() for _, y in v]
    if not xs:
        continue
    x0, x1 = math.log10(min(xs)), math.log10(max(xs))
    y0, y1 = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
    ox = p * W + L
    fx = lambda n: ox + (math.log10(n) - x0) / max(x1 - x0, 1e-9) * (W - L - 20)
    fy = lambda y: T + (y1 - math.log10(y)) / max(y1 - y0, 1e-9) * (H - T - 10)
    svg.append(f'<text x="{ox}" y="18" font-weight="bold">{title}</text>')
    svg.append(f'<rect x="{ox}" y="{T}" width="{W - L - 20}" height="{H - T - 10}" fill="none" stroke="#999"/>')
    for e in range(y0, y1 + 1):
        svg.append(f'<text x="{ox - 5}" y="{fy(10 ** e) + 4:.1f}" text-anchor="end">1e{e}</text>')
        svg.append(f'<line x1="{ox}" x2="{ox + W - L - 20}" y1="{fy(10 ** e):.1f}" y2="{fy(10 ** e):.1f}" stroke="#eee"/>')
    for n in sorted(set(xs)):
        svg.append(f'<text x="{fx(n):.1f}" y="{H + 5}" text-anchor="middle">{n}</text>')
    for i, l in enumerate(all_labels):
        if len(pts[l]) < 1:
            continue
        c = colours[i % len(colours)]
        dash = ' stroke-dasharray="4 3"' if "causal" in l else ""
        path = " ".join(f"{'M' if j == 0 else 'L'}{fx(n):.1f},{fy(y):.1f}" for j, (n, y) in enumerate(pts[l]))
        svg.append(f'<path d="{path}" fill="none" stroke="{c}" stroke-width="{3 if l.startswith("exact") else 1.5}"{dash}/>')
    svg.append(f'<text x="{ox + (W - L) / 2}" y="{H + 22}" text-anchor="middle">N (B = 1, H = 8, D = 64)</text>')
for i, l in enumerate(all_labels):
    c = colours[i % len(colours)]
    y = T + 14 * i
    dash = ' stroke-dasharray="4 3"' if "causal" in l else ""
    svg.append(f'<line x1="{len(panels) * W + 5}" x2="{len(panels) * W + 30}" y1="{y}" y2="{y}" stroke="{c}" stroke-width="2"{dash}/>')
    svg.append(f'<text x="{len(panels) * W + 35}" y="{y + 4}">{l}</text>')
svg.append("</svg>")
open("bench-out/variants.svg", "w").write("\n".join(svg) + "\n")
EOF
