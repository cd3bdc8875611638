#!/bin/sh
# The variants against exact attention: for each length N, every variant and the exact fused
# kernel (causal and not) timed in their own processes (so each peak memory is its own),
# alternating over rounds, forward and forward+backward, B = 1, H = 8, D = 64, 2 threads.
# Prints a table (median over rounds of each call's median, its ratio to exact attention of the
# same causality, peak memory beyond the inputs, and up to N = 16 384 the output's relative
# Frobenius distance from exact softmax attention on the same inputs) and writes every measurement to
# bench-out/variants.jsonl. The CPU model and the FMA ceiling measured in the same run head it.
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
EOF
