#!/bin/sh
# Structured patterns against the dense kernel, in one run: the FMA ceiling now, dense and causal
# attention, then every pattern. GFLOP/s count only the pairs a pattern leaves visible (4·D FLOPs
# per pair forward); "of dense" is each row's GFLOP/s over the dense row's.
# Usage: sh bench/patterns.sh [N]   (default N = 8192; B = 1, H = 8, D = 64, forward)
set -e
cd "$(dirname "$0")/.."
cargo build --release -q -p attentive-cli
bin=./target/release/attentive
n=${1:-8192}
peak=$($bin peak --threads 2)
fma=$(echo "$peak" | sed 's/.*"fma_gflops": *\([0-9.]*\).*/\1/')
echo "ceiling: $peak"
dense=""
run() {
    label=$1; shift
    json=$($bin bench --json --heads 8 --seq "$n" --dim 64 --iters 5 "$@" | tail -n 1)
    gf=$(echo "$json" | sed 's/.*"gflops":\([0-9.]*\).*/\1/')
    ms=$(echo "$json" | sed 's/.*"median_ms":\([0-9.]*\).*/\1/')
    [ -z "$dense" ] && dense=$gf
    awk -v l="$label" -v g="$gf" -v m="$ms" -v f="$fma" -v d="$dense" \
        'BEGIN { printf "| %-36s | %9.2f | %6.1f | %5.1f%% | %5.1f%% |\n", l, m, g, 100*g/d, 100*g/f }'
}
echo "| N=$n, H=8, D=64, forward | ms | GFLOP/s | of dense | of ceiling |"
echo "|---|---|---|---|---|"
run "dense"
run "causal" --causal top-left
for p in window:256,0 window:128,128 dilated:128,2 strided:128 fixed:128,32 longformer:128:0 \
         longformer:128:0,1,2,3,4,5,6,7 bigbird:64,3,1 prefix:1024 sink:4,512 sink:4,512+strided:128; do
    run "$p" --pattern "$p"
done
