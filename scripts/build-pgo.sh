#!/usr/bin/env bash
# Profile-guided release build of cpushare-node: build an instrumented node, run the
# overlay benchmark's cpushare part with it as the training load (pings, then TCP both
# ways through a real buyer/seller/guest), merge the profiles, rebuild with them.
#
# Why: on a busy or virtualised host, a frame that arrives after a quiet spell finds
# our code cold, and the round trip is paid in cache and page-walk misses. The
# profile lets LLVM lay the data path out densely (hot blocks together, cold ones
# split off), so fewer lines and pages are touched per frame. See docs/BENCHMARKS.md
# (overlay, "Latency").
#
# Usage (root: the training load uses network namespaces):
#   scripts/build-pgo.sh                  -> target/pgo/cpushare-node
# Needs llvm-profdata of rustc's own LLVM (`rustup component add llvm-tools`; tried
# automatically) and what scripts/bench-overlay.sh needs (iperf3, busybox, jq).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$ROOT/target/pgo
log() { echo "[$(date +%T)] $*" >&2; }
die() { log "FATAL: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (the training load uses network namespaces)"

HOST=$(rustc -vV | sed -n 's/^host: //p')
profdata() { ls "$(rustc --print sysroot)"/lib/rustlib/*/bin/llvm-profdata 2>/dev/null | head -n1; }
PD=$(profdata || true)
if [ -z "$PD" ]; then
  rustup component add llvm-tools >&2 || die "no llvm-profdata: run 'rustup component add llvm-tools'"
  PD=$(profdata || true)
fi
[ -x "$PD" ] || die "no llvm-profdata in $(rustc --print sysroot)"

rm -rf "$OUT/profiles" "$OUT/train"; mkdir -p "$OUT/profiles"
# An explicit --target keeps the flags off build scripts and proc macros.
log "building the instrumented node"
RUSTFLAGS="-Cprofile-generate=$OUT/profiles" \
  cargo build --release --locked -p node --target "$HOST" --target-dir "$OUT/gen" >&2
log "training: the overlay benchmark's cpushare part (about 2 minutes)"
LLVM_PROFILE_FILE="$OUT/profiles/node-%p-%m.profraw" NODE="$OUT/gen/$HOST/release/cpushare-node" \
  BUILD=0 ANCHORS="" REPS=1 DUR=5 PINGS=500 REVERSE=1 WORK="$OUT/train" \
  "$ROOT/scripts/bench-overlay.sh" >&2 || die "the training run failed (logs: $OUT/train)"
ls "$OUT"/profiles/*.profraw >/dev/null 2>&1 || die "the training run left no profiles in $OUT/profiles"
"$PD" merge -o "$OUT/node.profdata" "$OUT"/profiles/*.profraw
log "building with the profile"
RUSTFLAGS="-Cprofile-use=$OUT/node.profdata -Cllvm-args=-pgo-warn-missing-function=false" \
  cargo build --release --locked -p node --target "$HOST" --target-dir "$OUT/use" >&2
cp "$OUT/use/$HOST/release/cpushare-node" "$OUT/cpushare-node"
log "done: $OUT/cpushare-node"
