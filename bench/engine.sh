#!/bin/sh
# The engine's benchmark: the FMA ceiling measured now, then the fused kernel on the shapes of the
# engine issue, in one run, with efficiency = kernel GFLOP/s / ceiling.
# Usage: sh bench/engine.sh [--memory]   (--memory adds the N = 65536 forward+backward run, ~1 min)
set -e
cd "$(dirname "$0")/.."
cargo build --release -q -p attentive-cli
bin=./target/release/attentive
peak=$(sh ../shared/tools/peak.sh 2)
fma=$(echo "$peak" | sed 's/.*"fma_gflops": *\([0-9.]*\).*/\1/')
echo "ceiling: $peak"
run() {
    label=$1; shift
    json=$($bin bench --json "$@" | tail -n 1)
    gf=$(echo "$json" | sed 's/.*"gflops":\([0-9.]*\).*/\1/')
    ms=$(echo "$json" | sed 's/.*"median_ms":\([0-9.]*\).*/\1/')
    mem=$(echo "$json" | sed 's/.*"extra_rss_mb":\([0-9.]*\).*/\1/')
    awk -v l="$label" -v g="$gf" -v m="$ms" -v f="$fma" -v x="$mem" \
        'BEGIN { printf "%-44s %9.2f ms %8.1f GFLOP/s %6.1f%% of ceiling  %7.1f MB extra\n", l, m, g, 100*g/f, x }'
}
run "forward       B=1 H=8 N=2048 D=64" --heads 8 --seq 2048 --dim 64
run "forward       B=1 H=8 N=2048 D=64 causal" --heads 8 --seq 2048 --dim 64 --causal top-left
run "fwd+bwd       B=1 H=8 N=2048 D=64" --heads 8 --seq 2048 --dim 64 --backward
run "forward       B=1 H=8 N=2048 D=128" --heads 8 --seq 2048 --dim 128
run "decode        B=1 H=32 1 query, 32768 keys D=128" --heads 32 --seq 1 --kv-seq 32768 --dim 128
if [ "$1" = "--memory" ]; then
    run "fwd+bwd       B=1 H=1 N=65536 D=64" --heads 1 --seq 65536 --dim 64 --backward --iters 1
fi
