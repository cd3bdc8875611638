#!/bin/sh
# The engine's benchmark: this machine's FMA ceiling measured now (`attentive peak`), then the
# fused kernel on the shapes of the engine issue, in one run, with efficiency = kernel GFLOP/s /
# ceiling.
# Usage: sh bench/engine.sh [--memory | --quick]
#   --memory adds the N = 65536 forward+backward run (~1 min);
#   --quick runs small shapes and a short probe, to check that the benchmark runs (seconds).
set -e
cd "$(dirname "$0")/.."
cargo build --release -q -p attentive-cli
bin=./target/release/attentive
if [ "$1" = "--quick" ]; then
    n=256; keys=4096; probe="--read-mib 64"; iters="--iters 3"
else
    n=2048; keys=32768; probe=""; iters=""
fi
peak=$($bin peak --threads 2 $probe)
fma=$(echo "$peak" | sed 's/.*"fma_gflops": *\([0-9.]*\).*/\1/')
echo "ceiling: $peak"
run() {
    label=$1; shift
    json=$($bin bench --json $iters "$@" | tail -n 1)
    gf=$(echo "$json" | sed 's/.*"gflops":\([0-9.]*\).*/\1/')
    ms=$(echo "$json" | sed 's/.*"median_ms":\([0-9.]*\).*/\1/')
    mem=$(echo "$json" | sed 's/.*"extra_rss_mb":\([0-9.]*\).*/\1/')
    awk -v l="$label" -v g="$gf" -v m="$ms" -v f="$fma" -v x="$mem" \
        'BEGIN { printf "%-44s %9.2f ms %8.1f GFLOP/s %6.1f%% of ceiling  %7.1f MB extra\n", l, m, g, 100*g/f, x }'
}
run "forward       B=1 H=8 N=$n D=64" --heads 8 --seq $n --dim 64
run "forward       B=1 H=8 N=$n D=64 causal" --heads 8 --seq $n --dim 64 --causal top-left
run "fwd+bwd       B=1 H=8 N=$n D=64" --heads 8 --seq $n --dim 64 --backward
run "forward       B=1 H=8 N=$n D=128" --heads 8 --seq $n --dim 128
run "decode        B=1 H=32 1 query, $keys keys D=128" --heads 32 --seq 1 --kv-seq $keys --dim 128
if [ "$1" = "--memory" ]; then
    run "fwd+bwd       B=1 H=1 N=65536 D=64" --heads 1 --seq 65536 --dim 64 --backward --iters 1
fi
