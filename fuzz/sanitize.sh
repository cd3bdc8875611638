#!/bin/sh
# The workspace's whole test suite (unit, integration and doc tests, the CLI's end-to-end runs)
# under AddressSanitizer, which stops at the first out-of-bounds access, use after free, double
# free or leak. The engine's tests run every case on each instruction set this CPU has (scalar,
# AVX2, AVX-512, AMX), so each SIMD path runs under it.
#
#   sh fuzz/sanitize.sh [CARGO TEST ARGUMENTS]
#
# Nightly compiler flags under RUSTC_BOOTSTRAP=1 on the stable toolchain; --target keeps the
# sanitizer off build scripts and procedural macros (which the compiler itself loads). The
# build goes to target/asan (ASAN_TARGET_DIR moves it): about 40 minutes on 2 cores the first
# time. Miri, for the unsafe code it can run, is the command at the top of
# crates/attentive/tests/miri.rs.
set -eu
cd "$(dirname "$0")/.."
export RUSTC_BOOTSTRAP=1
export RUSTFLAGS="-Zsanitizer=address" RUSTDOCFLAGS="-Zsanitizer=address"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:strict_string_checks=1}"
host=$(rustc -vV | sed -n 's/^host: //p')
cargo test --release --workspace --no-fail-fast --target "$host" --target-dir "${ASAN_TARGET_DIR:-target/asan}" "$@"
