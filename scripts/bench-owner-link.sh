#!/usr/bin/env bash
# The owner's traffic beside the swarm (issue 16): a seller's home uplink (default
# 1 Mbit/s up / 16 down, a 1 s FIFO: a deep modem buffer) carries chunk uploads at
# full speed to a peer fetching an image from it. Measured from the seller host, as
# the household would see it:
#   - ping to the far side: idle, while the swarm uploads with yielding on, and off;
#   - a competing bulk TCP flow (iperf3, TCP_S seconds) from the seller host: its
#     share of the uplink while the swarm uploads, yielding on and off.
# The seller first fetches the image from a buyer on the far side (which then leaves),
# then relays it to a second node there; its node reads `[swarm] upload_yield` from
# a config file, as a seller would.
#
# Usage (root):  scripts/bench-owner-link.sh             # one uplink (a few minutes)
#                UP=8mbit DOWN=64mbit scripts/bench-owner-link.sh
#                scripts/bench-owner-link.sh --cleanup   # leftovers of a killed run
# Knobs (env):   UP=1mbit DOWN=16mbit QUEUE_MS=1000 WARM_S=15 PING_S=30 TCP_S=30
#                NODE_CC= (the seller node's [swarm] tcp_congestion; unset: the kernel's)
#                MODES="on off" (on: the node's default signal; also acks, tcp,
#                owd: yielding on that upload_yield_signal; capKBPS: yielding off,
#                upload_max_kbps = KBPS)
#                NODE_BIN=target/debug/cpushare-node WORK=/tmp/col-bench
#                PREFIX=col-
# Needs: iproute2 ethtool jq iperf3 python3, and `cargo build -p node` first.
# Addresses are 192.0.2.0/24 inside namespaces this script creates.
set -euo pipefail

UP=${UP:-1mbit}
DOWN=${DOWN:-16mbit}
QUEUE_MS=${QUEUE_MS:-1000}
WARM_S=${WARM_S:-15}
PING_S=${PING_S:-30}
TCP_S=${TCP_S:-30}
MODES=${MODES:-"on off"}
W=${WORK:-/tmp/col-bench}
PREFIX=${PREFIX:-col-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
NODE_BIN=${NODE_BIN:-$ROOT/target/debug/cpushare-node}
PY=/usr/bin/python3

HUB=${PREFIX}hub
SELL=${PREFIX}seller
FAR=${PREFIX}far
ALL_NS=("$HUB" "$SELL" "$FAR")
S_IP=192.0.2.1
F_IP=192.0.2.2
PORT=7450

PIDS=()
. "$ROOT/scripts/lib/netns-bench.sh"
stop_all() {
  local p ns
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 1
  for ns in "${ALL_NS[@]}"; do
    ns_exists "$ns" || continue
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
  done
  PIDS=()
  wait 2>/dev/null || true
}
cleanup() {
  set +e
  stop_all
  local ns
  for ns in "${ALL_NS[@]}"; do ns_exists "$ns" && ip netns del "$ns"; done
}
if [ "${1:-}" = "--cleanup" ]; then cleanup; exit 0; fi
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
for t in ip tc ethtool jq iperf3 "$PY"; do
  command -v "$t" >/dev/null || { echo "missing $t (apt-get install iproute2 ethtool jq iperf3 python3)" >&2; exit 1; }
done
[ -x "$NODE_BIN" ] || { echo "no $NODE_BIN: run 'cargo build -p node' first (or set NODE_BIN)" >&2; exit 1; }
for ns in "${ALL_NS[@]}"; do
  if ns_exists "$ns"; then echo "namespace $ns exists; run '$0 --cleanup'" >&2; exit 1; fi
done
trap cleanup EXIT
trap 'exit 130' INT TERM

add_host() {
  local ns=$1 port=$2 addr=$3
  mkns "$ns"
  ip -n "$HUB" link add "$port" type veth peer name eth0 netns "$ns"
  ip -n "$HUB" link set "$port" master br0
  ip -n "$HUB" link set "$port" up
  ip -n "$ns" addr add "$addr/24" dev eth0
  ip -n "$ns" link set eth0 up
}
txb() { ip -n "$SELL" -s -j link show dev eth0 | jq '.[0].stats64.tx.bytes'; }

# Ping the far side for PING_S seconds; prints "median p95 max loss%".
ping_stats() {
  nsx "$SELL" ping -n -i 0.2 -w "$PING_S" "$F_IP" 2>/dev/null | "$PY" -c '
import re, sys
t = sorted(float(m.group(1)) for m in re.finditer(r"time=([0-9.]+)", sys.stdin.read()))
want = int(sys.argv[1]) * 5
if not t: print("- - - 100"); sys.exit()
print(f"{t[len(t)//2]:.1f} {t[min(len(t)-1, int(len(t)*0.95))]:.1f} {t[-1]:.1f} {100*(1-len(t)/want):.0f}")
' "$PING_S"
}

# ---------------------------------------------------------------- network
mkns "$HUB"
ip -n "$HUB" link add br0 type bridge stp_state 0 forward_delay 0
ip -n "$HUB" link set br0 up
add_host "$SELL" colsel "$S_IP"
add_host "$FAR" colfar "$F_IP"
shape "$SELL" eth0 "$UP"
shape "$HUB" colsel "$DOWN"
nsx "$SELL" ping -c1 -W2 "$F_IP" >/dev/null
mkdir -p "$W"; rm -rf "$W/run"; mkdir -p "$W/run"
# The fetch must outlast warm-up, ping and TCP phases at the full uplink rate.
UP_BPS=$(rate_bps "$UP")
FILE_MIB=${FILE_MIB:-$(( (UP_BPS / 8 * (WARM_S + PING_S + TCP_S + 30)) / 1048576 + 1 ))}
head -c $((FILE_MIB * 1048576)) /dev/urandom > "$W/file.bin"
log "uplink $UP / down $DOWN, FIFO ${QUEUE_MS} ms; image $FILE_MIB MiB; load $(cut -d' ' -f1-3 /proc/loadavg)"

start_bg "$FAR" "$W/run/iperf.out" iperf3 -s -B "$F_IP"
read -r IDLE_MED IDLE_P95 IDLE_MAX IDLE_LOSS < <(ping_stats)
log "idle ping: median $IDLE_MED ms, p95 $IDLE_P95, max $IDLE_MAX"
: > "$W/results.tsv"

for mode in $MODES; do
  R=$W/run/$mode; mkdir -p "$R"
  case $mode in
    on|off) printf '[swarm]\nupload_yield = "%s"\n' "$mode" > "$R/seller.toml" ;;
    acks|tcp|owd) printf '[swarm]\nupload_yield = "on"\nupload_yield_signal = "%s"\n' "$mode" > "$R/seller.toml" ;;
    cap*) printf '[swarm]\nupload_yield = "off"\nupload_max_kbps = %s\n' "${mode#cap}" > "$R/seller.toml" ;;
    *) echo "unknown mode $mode (on, off, acks, tcp, owd, capKBPS)" >&2; exit 1 ;;
  esac
  if [ -n "${NODE_CC:-}" ]; then printf 'tcp_congestion = "%s"\n' "$NODE_CC" >> "$R/seller.toml"; fi
  # The buyer (on the far side) seeds the image to the seller, then leaves: what the
  # seller then uploads, to a second node on the far side, it relays as a seller does.
  start_bg "$FAR" "$R/buyer.out" env RUST_LOG=${NODE_LOG:-warn} "$NODE_BIN" --role buyer \
    --data-dir "$R/b" --listen "/ip4/$F_IP/tcp/$PORT"
  BUYER_PID=${PIDS[-1]}
  wait_for 30 "buyer" grep -q "^peer id" "$R/buyer.out"
  BP=$(awk '/^peer id/{print $3; exit}' "$R/buyer.out")
  wait_for 30 "buyer control" "$NODE_BIN" --data-dir "$R/b" status
  IMAGE=$("$NODE_BIN" --data-dir "$R/b" image import --public "$W/file.bin" 2>/dev/null | tail -1)
  start_bg "$SELL" "$R/seller.out" env RUST_LOG=${NODE_LOG:-warn} "$NODE_BIN" --config "$R/seller.toml" \
    --role seller --data-dir "$R/s" --listen "/ip4/$S_IP/tcp/$PORT" --bootstrap "/ip4/$F_IP/tcp/$PORT/p2p/$BP"
  wait_for 30 "seller" grep -q "^peer id" "$R/seller.out"
  SP=$(awk '/^peer id/{print $3; exit}' "$R/seller.out")
  wait_for 30 "seller control" "$NODE_BIN" --data-dir "$R/s" status
  nsx "$SELL" "$NODE_BIN" --data-dir "$R/s" image fetch "$IMAGE" > "$R/seed.out" 2>&1
  kill -TERM "$BUYER_PID" 2>/dev/null || true
  wait_for 30 "buyer gone" bash -c "! kill -0 $BUYER_PID"
  start_bg "$FAR" "$R/far.out" env RUST_LOG=${NODE_LOG:-warn} "$NODE_BIN" --role seller --data-dir "$R/f" \
    --listen "/ip4/$F_IP/tcp/$((PORT + 1))" --bootstrap "/ip4/$S_IP/tcp/$PORT/p2p/$SP"
  wait_for 30 "far node" "$NODE_BIN" --data-dir "$R/f" status
  sleep 2
  start_bg "$FAR" "$R/fetch.out" "$NODE_BIN" --data-dir "$R/f" image fetch "$IMAGE"
  sleep "$WARM_S"
  # what the swarm itself sends meanwhile: a mode that yields by sending nothing
  # would keep the ping low and is no good either
  P0=$(txb)
  read -r L_MED L_P95 L_MAX L_LOSS < <(ping_stats)
  P1=$(txb)
  # the seller's pacer as it stands (capacity, pace, delays), for the record
  "$NODE_BIN" --data-dir "$R/s" status > "$R/status-ping.json" 2>/dev/null || true
  SWARM_BPS=$(( (P1 - P0) * 8 / PING_S ))
  log "yield $mode: ping median $L_MED ms, p95 $L_P95, max $L_MAX, loss $L_LOSS %; the swarm sent $((SWARM_BPS / 1000)) kbit/s meanwhile"
  if grep -q "100%" "$R/fetch.out" 2>/dev/null; then
    log "yield $mode: the far node's fetch ended during the ping phase: the swarm did not load the line throughout (raise FILE_MIB)"
  fi
  T0=$(txb)
  nsx "$SELL" iperf3 -c "$F_IP" -t "$TCP_S" -J > "$R/iperf.json" 2>"$R/iperf.err" || true
  T1=$(txb)
  "$NODE_BIN" --data-dir "$R/s" status > "$R/status-tcp.json" 2>/dev/null || true
  TCP_BPS=$(jq '.end.sum_sent.bits_per_second // 0' "$R/iperf.json")
  ALL_BPS=$(( (T1 - T0) * 8 / TCP_S ))
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$mode" "$L_MED" "$L_P95" "$L_MAX" "$L_LOSS" "$TCP_BPS" "$ALL_BPS" "$SWARM_BPS" >> "$W/results.tsv"
  log "yield $mode: bulk TCP $(awk -v b="$TCP_BPS" 'BEGIN{printf "%.0f", b/1000}') kbit/s of $UP (all traffic $((ALL_BPS / 1000)) kbit/s)"
  stop_all
  start_bg "$FAR" "$W/run/iperf.out" iperf3 -s -B "$F_IP"
  rm -rf "$R/s/store" "$R/f/store" "$R/b/store"
done

"$PY" - "$W/results.tsv" "$UP" "$DOWN" "$QUEUE_MS" "$IDLE_MED" "$IDLE_P95" "$FILE_MIB" <<'PYEOF'
import sys
path, up, down, q, imed, ip95, mib = sys.argv[1:8]
def rate(s):
    s = s.lower()
    for suf, m in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1)):
        if s.endswith(suf): return float(s[:-len(suf)]) * m
    return float(s)
U = rate(up)
print(f"Seller uplink {up} (down {down}), {q} ms FIFO; a peer fetches a {mib} MiB image from it. "
      f"Idle ping median {imed} ms, p95 {ip95} ms.\n")
print("| swarm uploads | swarm kbit/s alone | ping median ms | ping p95 ms | ping max ms | ping loss % | median over idle ms | bulk TCP kbit/s | TCP share of the uplink |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for line in open(path):
    mode, med, p95, mx, loss, tcp, allb, swarm = line.rstrip("\n").split("\t")
    try: over = f"{float(med) - float(imed):+.0f}"
    except ValueError: over = "-"
    label = (f"upload_max_kbps = {mode[3:]}" if mode.startswith("cap")
             else "yielding on, TCP round-trip signal" if mode == "tcp"
             else "yielding on, one-way delay signal" if mode == "owd"
             else "yielding on, acks signal" if mode == "acks"
             else "yielding on (the default signal)" if mode == "on" else f"yielding {mode}")
    print(f"| {label} | {float(swarm)/1000:.0f} | {med} | {p95} | {mx} | {loss} | {over} | {float(tcp)/1000:.0f} | {float(tcp)/U:.2f} |")
PYEOF
