#!/usr/bin/env bash
# Chunk+hash throughput vs plain BLAKE3 of the same file (same run), store
# import throughput, and the share of a 1%-changed image in new chunks.
# Prints a markdown table. Env: CHUNKS_BENCH_MIB (default 256),
# CHUNKS_BENCH_ROUNDS (default 5), CHUNKS_BENCH_DIR (default $TMPDIR or /tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench -q -p chunks --bench chunking 2>/dev/null | sed -n '/^###/,$p'
