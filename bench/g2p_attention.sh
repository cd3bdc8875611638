#!/bin/sh
# The G2P model trained with each self-attention for the same wall-clock minutes from the same
# seed, one after another on this machine, then scored on the held-out test split (greedy
# decoding). Prints a table (steps reached, training tokens/s, test PER and WER) headed by the
# CPU model, and keeps each checkpoint under bench-out/g2p-NAME/ (eval.json holds its score).
# Usage: sh bench/g2p_attention.sh [MINUTES]   (default 5; NAMES="exact gla" for some)
set -e
cd "$(dirname "$0")/.."
cargo build --release -q -p attentive-cli
bin=./target/release/attentive
minutes=${1:-5}
mkdir -p bench-out
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(nproc) threads"
echo "| self-attention | steps in $minutes min | tokens/s | test PER | test WER |"
echo "|---|---:|---:|---:|---:|"
for name in ${NAMES:-exact linear performer lsh linformer gla adaptive-span}; do
    dir=bench-out/g2p-$name
    rm -rf "$dir"
    log=bench-out/g2p-$name.log
    $bin train g2p --minutes "$minutes" --seed 1 --valid-every 1000 --attention "$name" --out "$dir" > "$log" 2>&1
    last=$(grep '^step' "$log" | tail -n 1)
    steps=$(echo "$last" | awk '{print $2}')
    tps=$(echo "$last" | sed 's/.* \([0-9]*\) tokens\/s.*/\1/')
    per=$(sed -n 's/.*"per": *\([0-9.]*\).*/\1/p' "$dir/eval.json")
    wer=$(sed -n 's/.*"wer": *\([0-9.]*\).*/\1/p' "$dir/eval.json")
    printf '| %s | %s | %s | %.2f%% | %.2f%% |\n' "$name" "$steps" "$tps" "$per" "$wer"
done
