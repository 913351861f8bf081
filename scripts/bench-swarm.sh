#!/usr/bin/env bash
# Swarm benchmark: cpushare distributing one image from a slow buyer to 8 sellers,
# beside a naive "buyer uploads to everyone" HTTP run, in the topology of
# ../shared/bench/swarm-anchors.sh (bridge in a hub namespace; HTB-shaped links,
# buyer 8 Mbit/s up / 50 down, each seller 8 up / 50 down, 100 ms byte FIFO).
#
# Reports, per method: buyer bytes / image size (wire bytes from the buyer's
# eth0 counters; for cpushare also the payload counter) and last seller done /
# Kumar-Ross bound (67.1 s for 64 MiB; 70.2 s counting TCP/IP header overhead).
#
# Usage (root):  scripts/bench-swarm.sh            # full run (a few minutes)
#                scripts/bench-swarm.sh --cleanup  # remove leftovers of a killed run
# Knobs (env):   N=8 FILE_MIB=64 SEED_UP=8mbit SEED_DOWN=50mbit PEER_UP=8mbit
#                PEER_DOWN=50mbit QUEUE_MS=100 MODES="cpushare http" REPEATS=1
#                NODE_BIN=target/debug/cpushare-node WORK=/tmp/csw-bench PREFIX=csw-
#                CC= (TCP congestion control in the hosts, e.g. cubic; default: the kernel's)
# Needs: iproute2 ethtool jq curl python3, and `cargo build -p node` first.
# Addresses are 192.0.2.0/24 (TEST-NET-1) inside namespaces this script creates;
# nothing leaves the bridge. Cleans up (processes by PID, namespaces) on exit.
set -euo pipefail

N=${N:-8}
FILE_MIB=${FILE_MIB:-64}
SEED_UP=${SEED_UP:-8mbit}
SEED_DOWN=${SEED_DOWN:-50mbit}
PEER_UP=${PEER_UP:-8mbit}
PEER_DOWN=${PEER_DOWN:-50mbit}
QUEUE_MS=${QUEUE_MS:-100}
MODES=${MODES:-"cpushare http"}
REPEATS=${REPEATS:-1}
TIMEOUT=${TIMEOUT:-900}
W=${WORK:-/tmp/csw-bench}
PREFIX=${PREFIX:-csw-}
CC=${CC:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
NODE_BIN=${NODE_BIN:-$ROOT/target/debug/cpushare-node}
PY=/usr/bin/python3

HUB=${PREFIX}hub
SEED=${PREFIX}seed
PEERS=(); for i in $(seq 1 "$N"); do PEERS+=("${PREFIX}p$i"); done
ALL_NS=("$HUB" "$SEED" "${PEERS[@]}")
SEED_IP=192.0.2.1
peer_ip() { echo "192.0.2.$((10 + $1))"; }
PORT=7450

PIDS=()
. "$ROOT/scripts/lib/netns-bench.sh"
now() { date +%s.%N; }

kill_pids() {
  local p alive
  for p in "$@"; do kill -TERM "$p" 2>/dev/null || true; done
  for _ in $(seq 1 30); do
    alive=0
    for p in "$@"; do if kill -0 "$p" 2>/dev/null; then alive=1; fi; done
    [ $alive = 0 ] && break
    sleep 0.2
  done
  for p in "$@"; do kill -KILL "$p" 2>/dev/null || true; done
}
stop_all() {
  if [ ${#PIDS[@]} -gt 0 ]; then kill_pids "${PIDS[@]}"; fi
  PIDS=()
  local ns p
  for ns in "${ALL_NS[@]}"; do
    ns_exists "$ns" || continue
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
  done
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
for t in ip tc ethtool jq curl "$PY"; do
  command -v "$t" >/dev/null || { echo "missing $t (apt-get install iproute2 ethtool jq curl python3)" >&2; exit 1; }
done
[ -x "$NODE_BIN" ] || { echo "no $NODE_BIN: run 'cargo build -p node' first (or set NODE_BIN)" >&2; exit 1; }
for ns in "${ALL_NS[@]}"; do
  if ns_exists "$ns"; then echo "namespace $ns exists; run '$0 --cleanup'" >&2; exit 1; fi
done
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- network (as swarm-anchors.sh)
add_node() {
  local ns=$1 port=$2 addr=$3 up=$4 down=$5
  mkns "$ns"
  ip -n "$HUB" link add "$port" type veth peer name eth0 netns "$ns"
  ip -n "$HUB" link set "$port" master br0
  ip -n "$HUB" link set "$port" up
  ip -n "$ns" addr add "$addr/24" dev eth0
  ip -n "$ns" link set eth0 up
  shape "$ns" eth0 "$up"
  shape "$HUB" "$port" "$down"
}
setup_net() {
  mkns "$HUB"
  ip -n "$HUB" link add br0 type bridge stp_state 0 forward_delay 0
  ip -n "$HUB" link set br0 up
  add_node "$SEED" cswseed "$SEED_IP" "$SEED_UP" "$SEED_DOWN"
  local i
  for i in $(seq 1 "$N"); do add_node "${PEERS[$((i-1))]}" "cswp$i" "$(peer_ip "$i")" "$PEER_UP" "$PEER_DOWN"; done
  for i in $(seq 1 "$N"); do
    nsx "${PEERS[$((i-1))]}" ping -c1 -W2 "$SEED_IP" >/dev/null 2>&1 || \
      nsx "${PEERS[$((i-1))]}" ping -c1 -W2 "$SEED_IP" >/dev/null || { log "p$i cannot reach seed"; exit 1; }
  done
}
txb() { ip -n "$1" -s -j link show dev eth0 | jq '.[0].stats64.tx.bytes'; }
# packets the FIFO under the uplink's HTB class dropped
drops() { tc -n "$1" -s -j qdisc show dev eth0 | jq '[.[] | select(.kind == "bfifo" or .kind == "pfifo") | .drops] | add // 0'; }


# ---------------------------------------------------------------- runs
run_cpushare() {
  local d=$R i
  start_bg "$SEED" "$d/buyer.out" env RUST_LOG=${NODE_LOG:-warn} "$NODE_BIN" --role buyer --data-dir "$d/buyer" \
    --listen "/ip4/$SEED_IP/tcp/$PORT"
  wait_for 30 "buyer" grep -q "^peer id" "$d/buyer.out"
  local bp; bp=$(awk '/^peer id/{print $3; exit}' "$d/buyer.out")
  wait_for 30 "buyer control" "$NODE_BIN" --data-dir "$d/buyer" status
  IMAGE=$("$NODE_BIN" --data-dir "$d/buyer" image import --public "$W/file.bin" 2>/dev/null | tail -1)
  log "imported $IMAGE"
  for i in $(seq 1 "$N"); do
    start_bg "${PEERS[$((i-1))]}" "$d/p$i.out" env RUST_LOG=${NODE_LOG:-warn} "$NODE_BIN" --role seller --data-dir "$d/p$i" \
      --listen "/ip4/$(peer_ip "$i")/tcp/$PORT" --bootstrap "/ip4/$SEED_IP/tcp/$PORT/p2p/$bp"
  done
  for i in $(seq 1 "$N"); do wait_for 30 "seller $i" "$NODE_BIN" --data-dir "$d/p$i" status; done
  sleep 3   # connections, identify, kad settle before the clock starts
  S0=$(txb "$SEED"); D0=$(drops "$SEED"); T0=$(now); echo "$T0" > "$R/t0"
  for i in $(seq 1 "$N"); do
    ( timeout "$TIMEOUT" ip netns exec "${PEERS[$((i-1))]}" "$NODE_BIN" --data-dir "$d/p$i" image fetch "$IMAGE" \
        > "$d/p$i.fetch" 2>&1 && date +%s.%N > "$d/p$i.done" ) &
    PIDS+=($!)
  done
}
finish_cpushare() {
  local d=$R i ok=0
  "$NODE_BIN" --data-dir "$d/buyer" status --json > "$d/buyer-status.json"
  PAYLOAD=$(jq --arg id "$IMAGE" '.p2p.images[$id].uploaded_bytes' "$d/buyer-status.json")
  for i in $(seq 1 "$N"); do
    "$NODE_BIN" --data-dir "$d/p$i" image export "$IMAGE" "$d/p$i.bin" >/dev/null 2>&1 &&
      [ "$(sha256sum < "$d/p$i.bin" | cut -d' ' -f1)" = "$REF" ] && ok=$((ok + 1))
    rm -f "$d/p$i.bin"
  done
  OK=$ok
}
run_http() {
  local d=$R i
  start_bg "$SEED" "$d/http.out" "$PY" -m http.server 8000 --bind "$SEED_IP" --directory "$W"
  wait_for 20 "http server" nsx "$SEED" curl -s --max-time 1 -o /dev/null -I "http://$SEED_IP:8000/file.bin"
  S0=$(txb "$SEED"); D0=$(drops "$SEED"); T0=$(now)
  for i in $(seq 1 "$N"); do
    ( ip netns exec "${PEERS[$((i-1))]}" curl -sS --max-time "$TIMEOUT" -o "$d/p$i.bin" "http://$SEED_IP:8000/file.bin" \
        && date +%s.%N > "$d/p$i.done" ) &
    PIDS+=($!)
  done
}
finish_http() {
  local d=$R i ok=0
  for i in $(seq 1 "$N"); do
    [ -e "$d/p$i.bin" ] && [ "$(sha256sum < "$d/p$i.bin" | cut -d' ' -f1)" = "$REF" ] && ok=$((ok + 1))
    rm -f "$d/p$i.bin"
  done
  OK=$ok; PAYLOAD=-
}

run_one() {
  local mode=$1 rep=$2 i
  R=$W/run/$mode-$rep; rm -rf "$R"; mkdir -p "$R"
  log "run $mode #$rep (load $(cut -d' ' -f1-3 /proc/loadavg))"
  "run_$mode"
  local end=$(( $(date +%s) + TIMEOUT + 30 )) done status=ok
  while :; do
    done=0; for i in $(seq 1 "$N"); do [ -e "$R/p$i.done" ] && done=$((done + 1)); done
    [ "$done" -ge "$N" ] && break
    [ "$(date +%s)" -ge "$end" ] && { status="timeout($done/$N)"; break; }
    sleep 0.2
  done
  local s1 times=() last
  s1=$(txb "$SEED"); local d1; d1=$(drops "$SEED")
  for i in $(seq 1 "$N"); do
    if [ -e "$R/p$i.done" ]; then times+=("$(awk -v a="$(cat "$R/p$i.done")" -v b="$T0" 'BEGIN{printf "%.1f", a-b}')")
    else times+=("-"); fi
  done
  last=$(printf '%s\n' "${times[@]}" | { grep -v -- - || true; } | sort -n | tail -1)
  "finish_$mode"
  stop_all
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$mode" "$rep" "$last" \
    "$(printf '%s\n' "${times[@]}" | sort -n | paste -sd' ')" "$((s1 - S0))" "$PAYLOAD" "$OK/$N" "$status" "$((d1 - D0))" >> "$W/results.tsv"
  log "  -> last=$last s, buyer tx=$((s1 - S0)) B (payload $PAYLOAD), buyer FIFO drops $((d1 - D0)), sha ok $OK/$N, $status"
  rm -rf "$R"/p*/store "$R"/buyer/store
}

report() {
"$PY" - "$W/results.tsv" "$N" "$FILE_MIB" "$SEED_UP" "$PEER_UP" "$PEER_DOWN" <<'PYEOF'
import sys
path, n, mib, su, pu, pd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:7]
def rate(s):
    s = s.lower()
    for suf, m in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1)):
        if s.endswith(suf): return float(s[:-len(suf)]) * m
    return float(s)
F = mib * 1048576 * 8
us, ui, d = rate(su), rate(pu), rate(pd)
kr = max(F / us, F / d, n * F / (us + n * ui))
krh = kr * 1514 / 1448
names = {"cpushare": "cpushare (super-seeding buyer, rarest-first sellers)",
         "http": "naive HTTP (python http.server + curl)"}
print(f"Buyer up {su}, sellers up {pu} / down {pd}, N={n}, F={mib} MiB. "
      f"Kumar-Ross bound {kr:.1f} s ({krh:.1f} s with TCP/IP header overhead).\n")
print("| method | run | last seller done (s) | / K-R bound | / bound with headers | per-seller completion (s, sorted) | buyer wire bytes / F | buyer payload / F | buyer FIFO drops | sha256 ok |")
print("|---|---|---|---|---|---|---|---|---|---|")
Fb = mib * 1048576
for line in open(path):
    m, rep, last, times, stx, payload, ok, status, *rest = line.rstrip("\n").split("\t")
    drops = rest[0] if rest else "-"
    try: x, xh = f"{float(last)/kr:.3f}", f"{float(last)/krh:.3f}"
    except ValueError: x = xh = "-"
    pl = f"{int(payload)/Fb:.3f}" if payload not in ("-", "null", "") else "-"
    print(f"| {names.get(m, m)} | {rep} | {last} | {x} | {xh} | {times} | {int(stx)/Fb:.3f} | {pl} | {drops} | {ok}{'' if status == 'ok' else ' ' + status} |")
PYEOF
}

mkdir -p "$W"; rm -rf "$W/run"; : > "$W/results.tsv"
head -c $((FILE_MIB * 1048576)) /dev/urandom > "$W/file.bin"
REF=$(sha256sum < "$W/file.bin" | cut -d' ' -f1)
setup_net
log "net up: buyer up $SEED_UP / down $SEED_DOWN; sellers up $PEER_UP / down $PEER_DOWN; FIFO ${QUEUE_MS} ms"
for rep in $(seq 1 "$REPEATS"); do
  for mode in $MODES; do run_one "$mode" "$rep"; done
done
cleanup
trap - EXIT
report
