#!/usr/bin/env bash
# Overlay benchmark: cpushare's overlay vs the reference VPNs, side by side in one run.
#
# Each rep runs ../shared-style anchors (plain veth, OpenVPN tap AES-256-GCM, tinc
# switch mode, unencrypted vde2, boringtun) through overlay-anchors.sh, then cpushare
# in the same two-host topology:
#
#   netns covba ("buyer")  10.202.9.1/24 <-- veth --> 10.202.9.2/24  netns covbb ("seller")
#   covba: cpushare-node --role buyer; overlay switch, tap csovl0 = 10.77.0.1/16
#   covbb: cpushare-node --role seller; guest port = veth end in lease netns covbl
#   guest: netns covbg, veth covbgv (MAC/IP from the lease, address by DHCP via busybox udhcpc)
#   iperf3 client in the guest -> server on the buyer (TCP, DUR s, -P 1 and -P 4); ping guest -> buyer.
#
# Usage (root):  scripts/bench-overlay.sh              # REPS=3 DUR=10, all anchors
#   INSTALL=1 scripts/bench-overlay.sh                  # apt-get the VPNs/iperf3/busybox, cargo install boringtun-cli
#   REPS=1 DUR=5 ANCHORS="veth vde-udp" scripts/bench-overlay.sh
#   PERF=1 ...                                          # also perf-record both nodes during one -P 1 run
#   BUSY_POLL_US=N ...                                  # --busy-poll-us for both nodes (default: the node's default)
#   NOPOLL=1 ...                                        # also a "cpushare-nopoll" row: the same with --busy-poll-us 0
#   REVERSE=1 ...                                       # also buyer -> guest (iperf3 -R) for cpushare: a second table
#   VDE_GUEST=1 ...                                     # also "vde2-guest": vde2 with its guest where ours is, in a
#                                                       #   namespace behind a veth pair (bridged to vde's tap)
#   NODE=target/pgo/cpushare-node NODE_STD=target/release/cpushare-node BUILD=0 ...
#                                                       # the PGO build (scripts/build-pgo.sh), and the plain
#                                                       #   one as a second row "cpushare-std"
# Output: a Markdown table (medians) with ratios; raw data under $WORK (default /tmp/cov-bench).
set -u
export LC_ALL=C
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ANCHOR_SCRIPT=${ANCHOR_SCRIPT:-$ROOT/../shared/bench/overlay-anchors.sh}
[ -x "$ANCHOR_SCRIPT" ] || ANCHOR_SCRIPT=/work/shared/bench/overlay-anchors.sh
WORK=${WORK:-/tmp/cov-bench}
REPS=${REPS:-3}
DUR=${DUR:-10}
PINGS=${PINGS:-50}
ANCHORS=${ANCHORS-"veth ovpn-aes256gcm tinc-aes256cbc vde-udp boringtun"}
NODE=${NODE:-$ROOT/target/release/cpushare-node}
NODE_STD=${NODE_STD:-}
VDE_GUEST=${VDE_GUEST:-0}
UA=10.202.9.1 UB=10.202.9.2 OA=10.77.0.1
GMAC=52:54:00:77:09:02 GIP=10.77.0.2
HZ=$(getconf CLK_TCK)

log() { echo "[$(date +%T)] $*" >&2; }
die() { log "FATAL: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"

if [ "${INSTALL:-0}" = 1 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends busybox-static iperf3 jq >&2 || die "apt-get failed"
  INSTALL=1 CONFIGS=veth REPS=1 DUR=1 SAVE=0 WORK=$WORK/install "$ANCHOR_SCRIPT" >/dev/null || log "anchor install step reported a problem"
fi
for t in ip iperf3 ping jq busybox; do command -v $t >/dev/null || die "missing $t (try INSTALL=1)"; done
if [ "${BUILD:-1}" = 1 ]; then
  (cd "$ROOT" && cargo build --release -p node >&2) || die "cargo build --release -p node failed"
fi
[ -x "$NODE" ] || die "no node binary at $NODE"

rm -rf "$WORK"; mkdir -p "$WORK"
RAW=$WORK/raw.tsv
printf 'cfg\trep\tp1_mbps\tp1_retr\tp4_mbps\tp4_retr\trtt_min_ms\trtt_avg_ms\tloss_pct\tp1_daemon_cpu\tp1_sys_cpu\tp4_daemon_cpu\tp4_sys_cpu\tnote\tp1_bg_cpu\tp4_bg_cpu\tip_frags\tping_cpu_us\n' > "$RAW"

NSS="covba covbb covbl covbg"
PIDS=()
tree() { local p=$1 c; [ -d /proc/$p ] || return 0; echo "$p"
  for c in $(cat /proc/$p/task/*/children 2>/dev/null); do tree "$c"; done; }
ticks() { local t=0 p v; for p in $(for r in "$@"; do tree "$r"; done); do
    v=$(sed 's/^.*) //' /proc/$p/stat 2>/dev/null | awk '{print $12+$13}'); t=$((t + ${v:-0})); done; echo $t; }
sysbusy() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat; }
cpu_ns() { # CPU time (ns) of the overlay threads (ovl-*) of the given processes
  local t=0 p d v; for p in "$@"; do for d in /proc/$p/task/*; do
    case "$(cat $d/comm 2>/dev/null)" in ovl-*) v=$(awk '{print $1}' $d/schedstat 2>/dev/null); t=$((t + ${v:-0}));; esac
  done; done; echo $t; }
running() { local s; s=$(awk '/^State:/{print $2}' /proc/$1/status 2>/dev/null); [ -n "$s" ] && [ "$s" != Z ]; }
teardown() {
  local p
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for _ in $(seq 30); do local alive=0; for p in "${PIDS[@]}"; do running $p && alive=1; done
    [ $alive = 0 ] && break; sleep 0.1; done
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
  wait 2>/dev/null; PIDS=()
  for ns in $NSS; do ip netns del $ns 2>/dev/null; done
  return 0
}
trap teardown EXIT
trap 'exit 130' INT TERM
wait_for() { local end=$(( $(date +%s) + $1 )); shift
  while [ "$(date +%s)" -lt $end ]; do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done; return 1; }

hosts() { # fresh buyer, seller and guest namespaces; buyer and seller joined by a veth pair
  teardown
  for ns in covba covbb covbg; do ip netns add $ns || return 1; ip -n $ns link set lo up; done
  ip link add covbva netns covba type veth peer name covbvb netns covbb || return 1
  ip -n covba addr add $UA/24 dev covbva; ip -n covbb addr add $UB/24 dev covbvb
  ip -n covba link set covbva up; ip -n covbb link set covbvb up
}

setup_cpushare() { # [busy-poll-us]
  local bp=${1:-${BUSY_POLL_US:-}} bpa=()
  [ -n "$bp" ] && bpa=(--busy-poll-us "$bp")
  hosts || return 1
  local d=$WORK/node; rm -rf $d; mkdir -p $d/a $d/b
  ip netns exec covba "$NODE" --role buyer --data-dir $d/a --listen /ip4/127.0.0.1/tcp/0 >$WORK/buyer.log 2>&1 </dev/null &
  PIDS+=($!)
  ip netns exec covbb "$NODE" --role seller --data-dir $d/b --listen /ip4/127.0.0.1/tcp/0 >$WORK/seller.log 2>&1 </dev/null &
  PIDS+=($!)
  wait_for 20 test -S $d/a/control.sock && wait_for 20 test -S $d/b/control.sock || { log "nodes did not start"; return 1; }
  local skey bkey
  skey=$("$NODE" --data-dir $d/b id | awk '/public key/{print $3}')
  bkey=$("$NODE" --data-dir $d/a id | awk '/public key/{print $3}')
  "$NODE" --data-dir $d/a overlay admit --key "$skey" --mac $GMAC --ip $GIP --listen 0.0.0.0:7451 "${bpa[@]}" >&2 || return 1
  # The lease namespace with the guest's veth end; the seller opens its guest port there.
  # Nodes that take --iface only in a lease namespace they made create it (netns-add),
  # named in the seller's mount namespace (it runs under `ip netns exec`), so the veth
  # is plugged in from there; older nodes, without that command, take one made here.
  local in_seller=()
  if "$NODE" --data-dir $d/b overlay netns-add covbl >&2 2>/dev/null; then
    in_seller=(nsenter -t "${PIDS[-1]}" -m)
  else
    ip netns add covbl || return 1
  fi
  "${in_seller[@]}" ip link add covbgv netns covbg type veth peer name covblv netns covbl || return 1
  "${in_seller[@]}" ip -n covbl link set covblv mtu 9000
  ip -n covbg link set covbgv address $GMAC
  ip -n covbg link set covbgv up
  "$NODE" --data-dir $d/b overlay attach --netns covbl --iface covblv --buyer $UA:7451 --buyer-key "$bkey" \
    --mac $GMAC --ip $GIP --max-mbit ${MAX_MBIT:-20000} --max-pps ${MAX_PPS:-4000000} "${bpa[@]}" >&2 || return 1
  printf '#!/bin/sh\ncase "$1" in bound|renew) ip addr flush dev "$interface"; ip addr add "$ip/$mask" dev "$interface"; [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu";; esac\nexit 0\n' > $WORK/udhcpc.sh
  chmod +x $WORK/udhcpc.sh
  ip netns exec covbg busybox udhcpc -i covbgv -f -q -n -t 10 -T 1 -s $WORK/udhcpc.sh >&2 || { log "guest got no DHCP lease"; return 1; }
}

QUIET_PCT=${QUIET_PCT:-15} QUIET_MAX=${QUIET_MAX:-60}   # same idle gate as overlay-anchors.sh
NCPU=$(nproc)
quiet_gate() { local end=$(( $(date +%s) + QUIET_MAX )) s0 s1 b
  while :; do s0=$(sysbusy); sleep 1; s1=$(sysbusy); b=$(( (s1 - s0) * 100 / HZ ))
    [ "$b" -le "$QUIET_PCT" ] && break; [ "$(date +%s)" -ge $end ] && break; done; echo $b; }
iperf_run() { # P tag [profile] [extra iperf3 args] -> "mbps retr daemon_cpu% sys_cpu%"
  local P=$1 f=$WORK/iperf-$2.json c0 c1 s0 s1 t0 t1 extra=${4:-}
  quiet_gate >/dev/null
  local perfpid=
  if [ -n "${3:-}" ]; then # system-wide profile of this run (nodes, iperf3, kernel)
    perf record -a -g -F 499 -o $WORK/perf.data -- sleep $((DUR - 1)) >/dev/null 2>&1 &
    perfpid=$!
  fi
  c0=$(ticks "${PIDS[@]:0:2}"); s0=$(sysbusy); t0=$(date +%s%N)
  ip netns exec covbg timeout $((DUR + 30)) iperf3 -c $OA -t $DUR -P $P $extra -J > $f 2>&1
  c1=$(ticks "${PIDS[@]:0:2}"); s1=$(sysbusy); t1=$(date +%s%N)
  if [ -n "$perfpid" ]; then
    wait $perfpid
    perf report -i $WORK/perf.data --no-children --sort comm,dso,sym --percent-limit 0.7 --stdio -g none > $WORK/perf-report.txt 2>/dev/null
    perf report -i $WORK/perf.data --no-children --sort comm --stdio -g none > $WORK/perf-comm.txt 2>/dev/null
    log "perf reports: $WORK/perf-report.txt $WORK/perf-comm.txt"
  fi
  local mbps retr
  mbps=$(jq -r '.end.sum_received.bits_per_second / 1e6 | . * 10 | round / 10' $f 2>/dev/null)
  retr=$(jq -r '.end.sum_sent.retransmits' $f 2>/dev/null)
  awk -v m="${mbps:-NA}" -v r="${retr:-NA}" -v c=$((c1 - c0)) -v s=$((s1 - s0)) -v dt=$((t1 - t0)) -v hz=$HZ \
    'BEGIN{ if (m=="" || m=="null") m="NA"; if (r=="" || r=="null") r="NA"; sec=dt/1e9;
            printf "%s %s %.0f %.0f\n", m, r, 100*c/hz/sec, 100*s/hz/sec }'
}

setup_vde_guest() {
  # Unencrypted vde2 (vde_plug tap <-> UDP) with its guest where ours is: a namespace of
  # its own behind a veth pair, bridged on the seller to vde's tap (how a guest joins
  # a tap VPN). Same namespaces and addresses as cpushare, static guest address.
  hosts || return 1
  ip netns exec covba vde_plug tap://csovl0 "udp://$UA:7001->$UB:7002" >$WORK/vde-a.log 2>&1 </dev/null &
  PIDS+=($!)
  ip netns exec covbb vde_plug tap://covbtap "udp://$UB:7002->$UA:7001" >$WORK/vde-b.log 2>&1 </dev/null &
  PIDS+=($!)
  wait_for 10 ip -n covba link show csovl0 && wait_for 10 ip -n covbb link show covbtap || { log "vde_plug did not start"; return 1; }
  ip -n covba addr add $OA/16 dev csovl0; ip -n covba link set csovl0 mtu 1400 up
  ip -n covbb link add covbbr type bridge; ip -n covbb link set covbbr up
  ip link add covbgv netns covbg type veth peer name covbbg netns covbb || return 1
  for l in covbtap covbbg; do ip -n covbb link set $l master covbbr; ip -n covbb link set $l mtu 1400 up; done
  ip -n covbg link set covbgv address $GMAC mtu 1400 up; ip -n covbg addr add $GIP/16 dev covbgv
}

measure() { # rep [cfg busy-poll-us]: one row (cpushare, a variant of it, or vde2-guest)
  local rep=$1 cfg=${2:-cpushare} bpv=${3:-${BUSY_POLL_US:-default}}
  local NODE=$NODE; [ $cfg = cpushare-std ] && NODE=$NODE_STD
  local setup="setup_cpushare ${3:-}" note="Noise IK + ChaCha20-Poly1305, guest behind veth + AF_PACKET lease port, DHCP MTU, busy-poll $bpv us"
  [ $cfg = vde2-guest ] && setup=setup_vde_guest note="vde2 tap<->UDP, no encryption; guest behind veth + bridge to the tap"
  if ! $setup; then
    log "$cfg rep$rep: setup failed (see $WORK/*.log)"
    printf '%s\t%s\tNA\tNA\tNA\tNA\tNA\tNA\tNA\t-\t-\t-\t-\tSETUP FAILED\t-\t-\t-\t-\n' $cfg $rep >> "$RAW"; return 1
  fi
  ip netns exec covba iperf3 -s -B $OA >$WORK/iperf-srv.log 2>&1 </dev/null &
  PIDS+=($!)
  sleep 0.5
  wait_for 20 ip netns exec covbg ping -c1 -W1 $OA || log "$cfg rep$rep: overlay never came up"
  sleep 2
  ip netns exec covbg timeout 20 iperf3 -c $OA -t 2 >/dev/null 2>&1
  local pr rmin ravg loss r1 r4
  quiet_gate >/dev/null   # as overlay-anchors.sh does before its ping
  local n0 n1
  n0=$(cpu_ns "${PIDS[@]:0:2}")
  pr=$(ip netns exec covbg timeout 30 ping -q -c $PINGS -i 0.05 -W 1 $OA 2>&1)
  n1=$(cpu_ns "${PIDS[@]:0:2}")
  local pcpu=$(( (n1 - n0) / 1000 / PINGS ))   # both nodes' overlay threads' CPU per ping round trip, µs
  [ $cfg = vde2-guest ] && pcpu=-
  rmin=$(echo "$pr" | awk -F'[/ ]' '/^rtt/{print $7}'); ravg=$(echo "$pr" | awk -F'[/ ]' '/^rtt/{print $8}')
  loss=$(echo "$pr" | grep -o '[0-9.]*% packet loss' | cut -d% -f1)
  local prof=; [ "${PERF:-0}" = 1 ] && [ "$rep" = 1 ] && [ $cfg = cpushare ] && command -v perf >/dev/null && prof=1
  r1=$(iperf_run 1 $cfg-$rep-P1 "$prof")
  r4=$(iperf_run 4 $cfg-$rep-P4)
  if [ "${REVERSE:-0}" = 1 ]; then
    local v1 v4
    v1=$(iperf_run 1 $cfg-$rep-R1 "" -R); v4=$(iperf_run 4 $cfg-$rep-R4 "" -R)
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' $cfg $rep $(echo $v1 | cut -d' ' -f1-2) $(echo $v4 | cut -d' ' -f1-2) >> $WORK/reverse.tsv
    log "$cfg rep$rep: buyer -> guest P1 $(echo $v1 | cut -d' ' -f1) Mbit/s  P4 $(echo $v4 | cut -d' ' -f1) Mbit/s"
  fi
  local frag=0 ns v
  for ns in covba covbb covbg; do v=$(ip netns exec $ns awk '/^Ip:/{if(!h){for(i=1;i<=NF;i++)if($i=="FragCreates")c=i;h=1}else print $c}' /proc/net/snmp); frag=$((frag + ${v:-0})); done
  set -- $r1 $r4
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t-\t-\t%s\t%s\n' $cfg $rep $1 $2 $5 $6 "${rmin:-NA}" "${ravg:-NA}" "${loss:-NA}" \
    $3 $4 $7 $8 "$note" $frag $pcpu >> "$RAW"
  log "$cfg rep$rep: P1 $1 Mbit/s (retr $2, nodes ${3}%)  P4 $5 Mbit/s  rtt avg ${ravg:-NA} ms  overlay threads' CPU per ping ${pcpu} us"
  if [ $cfg != vde2-guest ]; then # drop counters by reason, for the record
    "$NODE" --data-dir $WORK/node/b overlay ls --json > $WORK/seller-overlay.log 2>&1
    "$NODE" --data-dir $WORK/node/a overlay ls --json > $WORK/buyer-overlay.log 2>&1
  fi
  mkdir -p $WORK/logs/$cfg-$rep; cp $WORK/*.log $WORK/logs/$cfg-$rep/ 2>/dev/null
  teardown
}

log "work dir $WORK; anchors: $ANCHORS; reps $REPS; dur ${DUR}s"
for rep in $(seq $REPS); do
  if [ -n "$ANCHORS" ]; then
    CONFIGS="$ANCHORS" REPS=1 DUR=$DUR PINGS=$PINGS SAVE=0 WORK=$WORK/anchors-$rep "$ANCHOR_SCRIPT" >/dev/null \
      || log "anchors rep$rep failed"
    tail -n +2 $WORK/anchors-$rep/raw.tsv 2>/dev/null | awk -F'\t' -v OFS='\t' -v r=$rep '{$2=r; print}' >> "$RAW"
  fi
  measure $rep
  [ "${NOPOLL:-0}" = 1 ] && measure $rep cpushare-nopoll 0
  [ -n "$NODE_STD" ] && measure $rep cpushare-std
  [ "$VDE_GUEST" = 1 ] && measure $rep vde2-guest
done
OURS=cpushare; [ "${NOPOLL:-0}" = 1 ] && OURS="$OURS cpushare-nopoll"
[ -n "$NODE_STD" ] && OURS="$OURS cpushare-std"
OTHERS=$ANCHORS; [ "$VDE_GUEST" = 1 ] && OTHERS="$OTHERS vde2-guest"

median() { grep -v -e '^NA$' -e '^-$' -e '^$' | sort -g | awk '{a[NR]=$1} END{ if (NR==0) print "NA"; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }
col() { awk -F'\t' -v c="$1" -v k="$2" 'NR>1 && $1==c {print $k}' "$RAW" | median; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (a=="NA" || b=="NA" || b==0) print "NA"; else printf "%.2f", a/b }'; }
TABLE=$WORK/table.md
{
  echo "| config | TCP -P1 Mbit/s | TCP -P4 Mbit/s | RTT avg ms | RTT min ms | cpushare P1 / this | cpushare P4 / this | this RTT / cpushare RTT | daemon CPU % (P1 / P4) | overlay threads' CPU per ping µs | n |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  c1=$(col cpushare 3); c4=$(col cpushare 5); cr=$(col cpushare 8)
  for cfg in $OURS $OTHERS; do
    p1=$(col $cfg 3); p4=$(col $cfg 5); ra=$(col $cfg 8)
    n=$(awk -F'\t' -v c=$cfg 'NR>1 && $1==c && $3!="NA" {n++} END{print n+0}' "$RAW")
    echo "| $cfg | $p1 | $p4 | $ra | $(col $cfg 7) | $(ratio $c1 $p1) | $(ratio $c4 $p4) | $(ratio $ra $cr) | $(col $cfg 10) / $(col $cfg 12) | $(col $cfg 18) | $n |"
  done
} > $TABLE
if [ -s $WORK/reverse.tsv ]; then
  rcol() { awk -F'\t' -v c="$1" -v k="$2" '$1==c {print $k}' $WORK/reverse.tsv | median; }
  {
    echo
    echo "| config | buyer -> guest TCP -P1 Mbit/s (iperf3 -R) | -P4 Mbit/s | / guest -> buyer P1 | / guest -> buyer P4 | retransmits P1 / P4 |"
    echo "|---|---:|---:|---:|---:|---:|"
    for cfg in $(echo $OURS $OTHERS | tr ' ' '\n' | grep -x -e 'cpushare.*' -e vde2-guest); do
      r1=$(rcol $cfg 3); r4=$(rcol $cfg 5)
      echo "| $cfg | $r1 | $r4 | $(ratio $r1 $(col $cfg 3)) | $(ratio $r4 $(col $cfg 5)) | $(rcol $cfg 4) / $(rcol $cfg 6) |"
    done
  } >> $TABLE
fi
cat $TABLE
log "raw: $RAW"
