#!/usr/bin/env bash
# Where a ping's round trip goes, hop by hop: cpushare's overlay next to unencrypted
# vde2 (vde_plug tap<->udp), in the benchmark's topology, timed by two kernel
# tracepoints only (net:net_dev_queue, net:netif_receive_skb: a few events per ping,
# so the tracing itself hardly moves the numbers, unlike syscall or scheduler traces).
#
#   cpushare: guest netns --veth--> lease netns (AF_PACKET) | seller --UDP--> buyer | tap csovl0 (host)
#   vde2:     netns b: tap vdeb | vde_plug --UDP--> vde_plug | tap vdea (netns a)
#
# Hops (the same points for both):
#   H1 the guest sends the request      (cpushare: guest veth xmit; vde2: tap vdeb xmit)
#   H2 the request datagram leaves      (seller / vde_plug b uplink xmit)
#   H3 the request enters the host      (buyer tap csovl0 / tap vdea receive)
#   H4 the host's reply leaves it       (csovl0 / vdea xmit)
#   H5 the reply datagram leaves        (buyer / vde_plug a uplink xmit)
#   H6 the reply reaches the guest      (guest veth / tap vdeb receive)
#
# Usage (root): scripts/overlay-latency-hops.sh        ROUNDS=3 PINGS=200 interleaved
#   NODE=/path/to/cpushare-node BUILD=0 ...             another build
#   CPU=1 ... (ROUNDS=0: only this)                    then also: CPU time per ping of every
#       thread (schedstat), with the nodes, vde_plug and ping all pinned to CPU 0, so the
#       round trip is the sum of everyone's work (no idle vCPU to wake): CPU_ROUNDS=3
#       interleaved rounds of CPU_PINGS=500 pings every 10 ms; CPU_PERF=1 adds a sampled
#       user / kernel split of the forwarding processes (perf, cpu-clock at 10 kHz).
#   FLOOR=1 ...                                         also a third config, "floor": the
#       overlay's own system calls without the overlay (overlay/examples/bare_forwarder.rs:
#       the same guest port, tap and UDP sockets, opened by the same code, forwarding raw
#       frames one per call), in its own copy of cpushare's topology (static addresses).
#   PAGES=1 ...                                         also the memory pages each forwarding process
#       touches per ping: accessed bits cleared (/proc/PID/clear_refs), one ping, then the
#       "Referenced" pages of each mapping (smaps), minus the same window without a ping;
#       PAGE_ROUNDS=30 of each. Shared libraries are left out: other processes (ping, ip)
#       set their pages' referenced flag too.
# Needs: perf, vde_plug (vde2), busybox (udhcpc), ping, ip. Prints a Markdown table.
set -u
export LC_ALL=C
ROOT=$(cd "$(dirname "$0")/.." && pwd)
NODE=${NODE:-$ROOT/target/release/cpushare-node}
ROUNDS=${ROUNDS:-3}
PINGS=${PINGS:-200}
W=${WORK:-/tmp/cov-hops}
UA=10.202.19.1 UB=10.202.19.2 OA=10.77.0.1 GMAC=52:54:00:77:19:02 GIP=10.77.0.2
VA=10.203.19.1 VB=10.203.19.2 VOA=10.78.19.1 VOB=10.78.19.2

die() { echo "FATAL: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"
for t in perf vde_plug busybox ping ip python3; do command -v $t >/dev/null || die "missing $t"; done
FLOOR=${FLOOR:-0}
FLOOR_BIN=${FLOOR_BIN:-$ROOT/target/release/examples/bare_forwarder}
FA=10.204.19.1 FB=10.204.19.2 FOA=10.79.0.1 FGIP=10.79.0.2
if [ "${BUILD:-1}" = 1 ]; then
  (cd "$ROOT" && cargo build --release -p node >&2) || die "cargo build --release -p node failed"
  if [ "$FLOOR" = 1 ]; then
    (cd "$ROOT" && cargo build --release -p overlay --example bare_forwarder >&2) || die "building bare_forwarder failed"
  fi
fi
[ -x "$NODE" ] || die "no node binary at $NODE"

NSS="hopa hopb hopl hopg hva hvb fpa fpb fpl fpg"
down() {
  for f in "$W"/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null; done
  sleep 0.3
  for ns in $NSS; do ip netns del $ns 2>/dev/null; done
}
trap down EXIT
down; rm -rf "$W"; mkdir -p "$W/a" "$W/b"

# cpushare: buyer netns hopa, seller netns hopb, lease netns hopl, guest netns hopg.
for ns in hopa hopb hopg; do ip netns add $ns; ip -n $ns link set lo up; done
ip link add hopva netns hopa type veth peer name hopvb netns hopb
ip -n hopa addr add $UA/24 dev hopva; ip -n hopb addr add $UB/24 dev hopvb
ip -n hopa link set hopva up; ip -n hopb link set hopvb up
ip netns exec hopa "$NODE" --role buyer --data-dir "$W/a" --listen /ip4/127.0.0.1/tcp/0 >"$W/buyer.log" 2>&1 </dev/null &
echo $! > "$W/buyer.pid"
ip netns exec hopb "$NODE" --role seller --data-dir "$W/b" --listen /ip4/127.0.0.1/tcp/0 >"$W/seller.log" 2>&1 </dev/null &
echo $! > "$W/seller.pid"
for _ in $(seq 100); do [ -S "$W/a/control.sock" ] && [ -S "$W/b/control.sock" ] && break; sleep 0.2; done
skey=$("$NODE" --data-dir "$W/b" id | awk '/public key/{print $3}')
bkey=$("$NODE" --data-dir "$W/a" id | awk '/public key/{print $3}')
"$NODE" --data-dir "$W/a" overlay admit --key "$skey" --mac $GMAC --ip $GIP --listen 0.0.0.0:7461 >/dev/null || die "overlay admit failed"
ip netns add hopl
ip link add hopgv netns hopg type veth peer name hoplv netns hopl
ip -n hopl link set hoplv mtu 9000
ip -n hopg link set hopgv address $GMAC; ip -n hopg link set hopgv up
"$NODE" --data-dir "$W/b" overlay attach --netns hopl --iface hoplv --buyer $UA:7461 --buyer-key "$bkey" \
  --mac $GMAC --ip $GIP >/dev/null || die "overlay attach failed"
printf '#!/bin/sh\ncase "$1" in bound|renew) ip addr flush dev "$interface"; ip addr add "$ip/$mask" dev "$interface"; [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu";; esac\nexit 0\n' > "$W/udhcpc.sh"
chmod +x "$W/udhcpc.sh"
ip netns exec hopg busybox udhcpc -i hopgv -f -q -n -t 10 -T 1 -s "$W/udhcpc.sh" >/dev/null 2>&1 || die "guest got no DHCP lease"

# vde2: netns hva / hvb, vde_plug tap <-> udp on each side.
for ns in hva hvb; do ip netns add $ns; ip -n $ns link set lo up; done
ip link add hvva netns hva type veth peer name hvvb netns hvb
ip -n hva addr add $VA/24 dev hvva; ip -n hvb addr add $VB/24 dev hvvb
ip -n hva link set hvva up; ip -n hvb link set hvvb up
ip netns exec hva vde_plug tap://hvta "udp://$VA:7001->$VB:7002" >/dev/null 2>&1 </dev/null &
echo $! > "$W/vdea.pid"
ip netns exec hvb vde_plug tap://hvtb "udp://$VB:7002->$VA:7001" >/dev/null 2>&1 </dev/null &
echo $! > "$W/vdeb.pid"
sleep 1
ip -n hva addr add $VOA/24 dev hvta; ip -n hva link set hvta mtu 1400 up
ip -n hvb addr add $VOB/24 dev hvtb; ip -n hvb link set hvtb mtu 1400 up
ip netns exec hopg ping -c 3 -W 1 $OA >/dev/null || die "no ping through cpushare"
ip netns exec hvb ping -c 3 -W 1 $VOA >/dev/null || die "no ping through vde2"

# floor: buyer fpa (tap ftap), seller fpb, lease netns fpl, guest netns fpg (static address).
CONFIGS="cpushare vde2"
if [ "$FLOOR" = 1 ]; then
  [ -x "$FLOOR_BIN" ] || die "no bare_forwarder at $FLOOR_BIN (BUILD=1 builds it)"
  for ns in fpa fpb fpl fpg; do ip netns add $ns; ip -n $ns link set lo up; done
  ip netns exec fpl sysctl -qw net.ipv6.conf.all.disable_ipv6=1
  ip link add fpva netns fpa type veth peer name fpvb netns fpb
  ip -n fpa addr add $FA/24 dev fpva; ip -n fpb addr add $FB/24 dev fpvb
  ip -n fpa link set fpva up; ip -n fpb link set fpvb up
  ip link add fpgv netns fpg type veth peer name fplv netns fpl
  ip -n fpl link set fplv mtu 9000
  ip -n fpg link set fpgv address $GMAC mtu 1400 up; ip -n fpg addr add $FGIP/16 dev fpgv
  ip netns exec fpa "$FLOOR_BIN" buyer ftap $FA:7471 >"$W/floora.log" 2>&1 </dev/null &
  echo $! > "$W/floora.pid"
  for _ in $(seq 50); do ip -n fpa link show ftap >/dev/null 2>&1 && break; sleep 0.1; done
  ip -n fpa addr add $FOA/16 dev ftap; ip -n fpa link set ftap mtu 1400 up
  ip netns exec fpb "$FLOOR_BIN" seller fpl fplv $FA:7471 >"$W/floorb.log" 2>&1 </dev/null &
  echo $! > "$W/floorb.pid"
  sleep 0.5
  ip netns exec fpg ping -c 3 -W 1 $FOA >/dev/null || die "no ping through the floor forwarder"
  CONFIGS="cpushare vde2 floor"
fi

trace() { # $1 name, $2 netns, $3 target
  perf record -q -a -o "$W/$1.data" -e net:net_dev_queue -e net:netif_receive_skb -- \
    ip netns exec "$2" ping -q -c "$PINGS" -i 0.05 -W 1 "$3" > "$W/$1.ping" 2>&1
  perf script -i "$W/$1.data" -F time,event,trace >> "$W/$1.txt" 2>/dev/null
  rm -f "$W/$1.data"
}
for r in $(seq "$ROUNDS"); do
  echo "round $r/$ROUNDS" >&2
  trace cpushare hopg $OA
  trace vde2 hvb $VOA
  [ "$FLOOR" = 1 ] && trace floor fpg $FOA
done

cpu_round() { # $1 config; prints "cfg rtt thread=us/ping ..."
  local rtt
  snap() { for f in buyer seller vdea vdeb floora floorb; do [ -f "$W/$f.pid" ] || continue; local p; p=$(cat "$W/$f.pid")
    for t in /proc/$p/task/*; do echo "$f:$(cat "$t/comm") $(awk '{print $1}' "$t/schedstat")"; done; done; }
  snap > "$W/cpu0"
  case $1 in
    cpushare) rtt=$(ip netns exec hopg taskset -c 0 ping -q -c "$CPU_PINGS" -i 0.01 -W 1 $OA | awk -F/ '/^rtt/{print $5}') ;;
    vde2) rtt=$(ip netns exec hvb taskset -c 0 ping -q -c "$CPU_PINGS" -i 0.01 -W 1 $VOA | awk -F/ '/^rtt/{print $5}') ;;
    floor) rtt=$(ip netns exec fpg taskset -c 0 ping -q -c "$CPU_PINGS" -i 0.01 -W 1 $FOA | awk -F/ '/^rtt/{print $5}') ;;
  esac
  snap > "$W/cpu1"
  echo "$1 $rtt $(python3 - "$W" "$CPU_PINGS" <<'PY'
import sys
w, n = sys.argv[1], int(sys.argv[2])
def rd(f):
    d = {}
    for l in open(f):
        k, v = l.rsplit(None, 1)
        d[k] = d.get(k, 0) + int(v)
    return d
a, b = rd(w + '/cpu0'), rd(w + '/cpu1')
print(' '.join(f'{k}={(b[k] - a.get(k, 0)) / n / 1000:.1f}' for k in sorted(b)))
PY
)"
}

[ "$ROUNDS" -gt 0 ] && python3 - "$W" <<'EOF'
import re, statistics as st, sys
w = sys.argv[1]
hops = {
    'cpushare': [('net_dev_queue', 'hopgv'), ('net_dev_queue', 'hopvb'), ('netif_receive_skb', 'csovl0'),
                 ('net_dev_queue', 'csovl0'), ('net_dev_queue', 'hopva'), ('netif_receive_skb', 'hopgv')],
    'vde2': [('net_dev_queue', 'hvtb'), ('net_dev_queue', 'hvvb'), ('netif_receive_skb', 'hvta'),
             ('net_dev_queue', 'hvta'), ('net_dev_queue', 'hvva'), ('netif_receive_skb', 'hvtb')],
    'floor': [('net_dev_queue', 'fpgv'), ('net_dev_queue', 'fpvb'), ('netif_receive_skb', 'ftap'),
              ('net_dev_queue', 'ftap'), ('net_dev_queue', 'fpva'), ('netif_receive_skb', 'fpgv')],
}
import os
hops = {c: h for c, h in hops.items() if os.path.exists(f'{w}/{c}.txt')}
names = ['guest -> request datagram out (seller / vde_plug b)', 'datagram -> host stack (buyer / vde_plug a)',
         'host stack answers', 'host reply -> reply datagram out', 'reply datagram -> guest', 'round trip (H1 -> H6)']
rx = re.compile(r'^\s*([\d.]+):\s+net:(\S+):\s+dev=(\S+)\s.*len=(\d+)')
res = {}
for cfg, steps in hops.items():
    ev = []
    for l in open(f'{w}/{cfg}.txt'):
        m = rx.match(l)
        if m and int(m.group(4)) < 200:  # ping-sized frames and their datagrams only
            ev.append((float(m.group(1)), m.group(2), m.group(3)))
    rows, i = [], 0
    while i < len(ev):
        if (ev[i][1], ev[i][2]) != steps[0]:
            i += 1
            continue
        ts, k, j = [ev[i][0]], 1, i + 1
        while j < len(ev) and k < len(steps) and ev[j][0] - ts[0] < 0.005:
            if (ev[j][1], ev[j][2]) == steps[k]:
                ts.append(ev[j][0])
                k += 1
            j += 1
        if k == len(steps):
            rows.append([(ts[n + 1] - ts[n]) * 1e6 for n in range(5)] + [(ts[5] - ts[0]) * 1e6])
            i = j
        else:
            i += 1
    res[cfg] = rows
n = {c: len(r) for c, r in res.items()}
floor = 'floor' in res
head = f"| hop | cpushare median µs (n={n['cpushare']}) | vde2 median µs (n={n['vde2']}) | cpushare - vde2 |"
if floor:
    head += f" floor median µs (n={n['floor']}) | cpushare - floor |"
print(head)
print('|---|---:|---:|---:|' + ('---:|---:|' if floor else ''))
for k, name in enumerate(names):
    a = st.median(r[k] for r in res['cpushare'])
    b = st.median(r[k] for r in res['vde2'])
    line = f'| {name} | {a:.1f} | {b:.1f} | {a - b:+.1f} |'
    if floor:
        f = st.median(r[k] for r in res['floor'])
        line += f' {f:.1f} | {a - f:+.1f} |'
    print(line)
EOF

if [ "${PAGES:-0}" = 1 ]; then
  refs() { # pid -> one line per mapping with referenced pages: "start-end name perm kB"
    awk '/^[0-9a-f]+-[0-9a-f]+ /{ key = $1 " " (NF >= 6 ? $6 : "[anon]") " " $2; next }
         /^Referenced:/{ if ($2 > 0) print key, $2 }' /proc/$1/smaps; }
  page_window() { # $1 label, $2 mode (idle|ping), $3 netns, $4 target, $5.. pids
    local label=$1 mode=$2 ns=$3 tgt=$4 p; shift 4
    for _ in $(seq "${PAGE_ROUNDS:-30}"); do
      sleep 0.05
      for p in "$@"; do echo 1 > /proc/$p/clear_refs; done
      if [ $mode = ping ]; then ip netns exec $ns ping -c 1 -W 1 $tgt >/dev/null; else sleep 0.0003; fi
      for p in "$@"; do refs $p | sed "s|^|$label $p $mode |"; done
    done >> "$W/pages.txt"
  }
  for mode in idle ping; do
    page_window cpushare $mode hopg $OA "$(cat "$W/buyer.pid")" "$(cat "$W/seller.pid")"
    page_window vde2 $mode hvb $VOA "$(cat "$W/vdea.pid")" "$(cat "$W/vdeb.pid")"
    [ "$FLOOR" = 1 ] && page_window floor $mode fpg $FOA "$(cat "$W/floora.pid")" "$(cat "$W/floorb.pid")"
  done
  for f in buyer seller vdea vdeb floora floorb; do [ -f "$W/$f.pid" ] && echo "$(cat "$W/$f.pid") $f"; done > "$W/roles.txt"
  python3 - "$W/pages.txt" "${PAGE_ROUNDS:-30}" "$W/roles.txt" <<'EOF'
import collections, sys
rounds = int(sys.argv[2])
role = dict(l.split() for l in open(sys.argv[3]))
role = {p: {'buyer': 'buyer node', 'seller': 'seller node', 'vdea': "vde_plug a (buyer's side)",
            'vdeb': "vde_plug b (seller's side)", 'floora': 'bare_forwarder, buyer side',
            'floorb': 'bare_forwarder, seller side'}[r] for p, r in role.items()}
kb = collections.defaultdict(float)
for l in open(sys.argv[1]):
    cfg, pid, mode, rng, name, perm, k = l.split()
    base = name.rsplit('/', 1)[-1]
    if base.startswith('lib') or base.startswith('ld-') or base == '[vdso]':
        continue  # shared: other processes set the referenced flag of these pages too
    if name in ('[anon]', '[heap]', '[stack]'):
        cls = 'heap, stacks, anonymous'
    else:
        cls = 'own binary, code' if 'x' in perm else 'own binary, data and constants'
    kb[(cfg, pid, cls, mode)] += int(k) / rounds
procs = sorted({(c, p) for c, p, _, _ in kb})
classes = ['own binary, code', 'own binary, data and constants', 'heap, stacks, anonymous']
print()
print('| 4 KiB pages touched per ping, per process (ping window minus idle window) | ' + ' | '.join(classes) + ' | total |')
print('|---|' + '---:|' * (len(classes) + 1))
for c, p in procs:
    v = [max(0.0, (kb[(c, p, k, 'ping')] - kb[(c, p, k, 'idle')]) / 4) for k in classes]
    print(f'| {c}: {role.get(p, p)} | ' + ' | '.join(f'{x:.1f}' for x in v) + f' | {sum(v):.1f} |')
EOF
fi

if [ "${CPU:-0}" = 1 ]; then
  CPU_ROUNDS=${CPU_ROUNDS:-3} CPU_PINGS=${CPU_PINGS:-500}
  for f in buyer seller vdea vdeb floora floorb; do [ -f "$W/$f.pid" ] && taskset -a -p -c 0 "$(cat "$W/$f.pid")" >/dev/null; done
  for r in $(seq "$CPU_ROUNDS"); do
    echo "cpu round $r/$CPU_ROUNDS" >&2
    cpu_round cpushare >> "$W/cpu.txt"
    cpu_round vde2 >> "$W/cpu.txt"
    [ "$FLOOR" = 1 ] && cpu_round floor >> "$W/cpu.txt"
  done
  python3 - "$W/cpu.txt" <<'EOF'
import statistics as st, sys
rows = {}
for l in open(sys.argv[1]):
    cfg, rtt, *kv = l.split()
    d = {k: float(v) for k, v in (x.split('=') for x in kv)}
    rows.setdefault(cfg, []).append((float(rtt) * 1000, d))
def med(cfg, f):
    return st.median(f(d) for _, d in rows[cfg])
# The data-path threads; the rest of both nodes (timers, tokio, idle helpers) is housekeeping.
seller = ['seller:ovl-g-hoplv', 'seller:ovl-u-hoplv']
buyer = ['buyer:ovl-buyer-udp', 'buyer:ovl-buyer-tap']
node = lambda k: k.split(':')[0] in ('buyer', 'seller')
print()
print(f"| all on CPU 0, per ping (medians of {len(rows['vde2'])} rounds) | cpushare | vde2 |")
print('|---|---:|---:|')
print(f"| RTT avg µs | {st.median(r for r, _ in rows['cpushare']):.0f} | {st.median(r for r, _ in rows['vde2']):.0f} |")
print(f"| seller side CPU µs (ovl-g + ovl-u / vde_plug b) | {med('cpushare', lambda d: sum(d.get(k, 0) for k in seller)):.1f} | {med('vde2', lambda d: d.get('vdeb:vde_plug', 0)):.1f} |")
print(f"| buyer side CPU µs (ovl-buyer-udp + ovl-buyer-tap / vde_plug a) | {med('cpushare', lambda d: sum(d.get(k, 0) for k in buyer)):.1f} | {med('vde2', lambda d: d.get('vdea:vde_plug', 0)):.1f} |")
other = lambda d: sum(v for k, v in d.items() if node(k) and k not in seller + buyer)
print(f"| cpushare nodes' other threads µs (timers, libp2p; in the vde2 rounds: idle) | {med('cpushare', other):.1f} | {med('vde2', other):.1f} |")
if 'floor' in rows:
    print(f"| floor (bare_forwarder): RTT avg µs, seller / buyer side CPU µs | {st.median(r for r, _ in rows['floor']):.0f}, {med('floor', lambda d: sum(v for k, v in d.items() if k.startswith('floorb:'))):.1f} / {med('floor', lambda d: sum(v for k, v in d.items() if k.startswith('floora:'))):.1f} | |")
EOF
  if [ "${CPU_PERF:-0}" = 1 ]; then
    # Sampled (cpu-clock, 10 kHz) user vs kernel time of the forwarding processes.
    cpu_split() { # $1 config, $2 pids, $3 netns, $4 target
      perf record -q -F 9999 -e cpu-clock -o "$W/$1-cpu.data" -p "$2" -- sleep $((CPU_PINGS / 100 + 2)) & local pp=$!
      sleep 0.3
      ip netns exec "$3" taskset -c 0 ping -q -c "$CPU_PINGS" -i 0.01 -W 1 "$4" >/dev/null
      wait $pp
      perf report -i "$W/$1-cpu.data" --sort dso --stdio -n 2>/dev/null | awk -v c="$1" -v n="$CPU_PINGS" '
        /^ *[0-9.]+%/ { if ($3 == "[kernel.kallsyms]") k += $2; else u += $2 }
        END { printf "| %s sampled: user / kernel µs per ping | %.1f / %.1f |\n", c, u * 100.02 / n, k * 100.02 / n }'
    }
    cpu_split cpushare "$(cat "$W/seller.pid"),$(cat "$W/buyer.pid")" hopg $OA
    cpu_split vde2 "$(cat "$W/vdeb.pid"),$(cat "$W/vdea.pid")" hvb $VOA
  fi
fi
