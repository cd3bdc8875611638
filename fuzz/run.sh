#!/bin/sh
# Runs every fuzz target for SECONDS (default 60) from a copy of its seed corpus, and fails on
# the first crash (a panic, an overflow), hang (an input over 20 s), leak or sanitizer report;
# the input that did it is left in $OUT (default fuzz-out/ at the repository's root) to be kept
# as a regression test.
#
#   sh fuzz/run.sh [SECONDS]
#
# cargo-fuzz (crates.io) builds with AddressSanitizer, which needs nightly compiler flags: the
# stable toolchain allows them under RUSTC_BOOTSTRAP=1. libFuzzer stops a process past 2 GiB;
# ATTENTIVE_MAX_MEMORY caps the engine's own allocations below that, so a request past the cap
# must be refused, not attempted. The text target reads the MiniLM wheel when ATTENTIVE_MINILM
# names it. FUZZ_TARGET_DIR moves the build (CI keeps it in its cache). FUZZ_SEED fixes
# libFuzzer's random seed (CI: 1, so that a run repeats the path a session checked; 0: drawn).
# FUZZ_RUNS stops a target after that many inputs if it gets there before SECONDS (the long
# runs: FUZZ_RUNS=1000000 sh fuzz/run.sh 1800). FUZZ_TARGETS picks targets (default: all).
set -eu
cd "$(dirname "$0")"
seconds=${1:-60}
out=${OUT:-$PWD/../fuzz-out}
mkdir -p "$out"
export RUSTC_BOOTSTRAP=1 ATTENTIVE_MAX_MEMORY=1G
command -v cargo-fuzz >/dev/null 2>&1 || cargo install -q cargo-fuzz --version 0.13.2 --locked
# Optimised, with debug assertions and overflow checks (an overflow is a finding, not a wrapped
# index); 16 codegen units: cargo-fuzz's default of one takes the engine's build past 20 minutes.
# FUZZ_SANITIZER=none leaves out AddressSanitizer (CI: the engine's ASan build alone takes
# over 15 minutes of this machine; the long runs keep it).
flags="-O -a --codegen-units 16 -s ${FUZZ_SANITIZER:-address} --target-dir ${FUZZ_TARGET_DIR:-target}"
cargo fuzz build $flags
for target in ${FUZZ_TARGETS:-npy pattern kernel shapes models text}; do
  corpus=$(mktemp -d)
  cp corpus/"$target"/* "$corpus"/ 2>/dev/null || true
  echo "fuzz $target: ${seconds} s"
  cargo fuzz run $flags "$target" "$corpus" -- -max_total_time="$seconds" -timeout=20 \
    -seed="${FUZZ_SEED:-0}" -runs="${FUZZ_RUNS:--1}" \
    -rss_limit_mb=2048 -max_len=16384 -artifact_prefix="$out/$target-" -print_final_stats=1 \
    2>"$out/$target.log" || { tail -40 "$out/$target.log"; exit 1; }
  grep -E "^stat::number_of_executed_units|^Done" "$out/$target.log" | tail -2
  rm -rf "$corpus"
done
