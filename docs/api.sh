#!/bin/sh
# Builds the API documentation of the workspace's crates with their math rendered (KaTeX, from
# docs/katex-header.html) into target/doc. Usage: sh docs/api.sh [--open]
set -e
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
RUSTDOCFLAGS="${RUSTDOCFLAGS:-} --html-in-header $root/docs/katex-header.html" \
    exec cargo doc --no-deps --workspace "$@"
