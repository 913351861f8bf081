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
if [ "${BUILD:-1}" = 1 ]; then
  (cd "$ROOT" && cargo build --release -p node >&2) || die "cargo build --release -p node failed"
fi
[ -x "$NODE" ] || die "no node binary at $NODE"

NSS="hopa hopb hopl hopg hva hvb"
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
done

python3 - "$W" <<'EOF'
import re, statistics as st, sys
w = sys.argv[1]
hops = {
    'cpushare': [('net_dev_queue', 'hopgv'), ('net_dev_queue', 'hopvb'), ('netif_receive_skb', 'csovl0'),
                 ('net_dev_queue', 'csovl0'), ('net_dev_queue', 'hopva'), ('netif_receive_skb', 'hopgv')],
    'vde2': [('net_dev_queue', 'hvtb'), ('net_dev_queue', 'hvvb'), ('netif_receive_skb', 'hvta'),
             ('net_dev_queue', 'hvta'), ('net_dev_queue', 'hvva'), ('netif_receive_skb', 'hvtb')],
}
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
print(f"| hop | cpushare median µs (n={n['cpushare']}) | vde2 median µs (n={n['vde2']}) | cpushare - vde2 |")
print('|---|---:|---:|---:|')
for k, name in enumerate(names):
    a = st.median(r[k] for r in res['cpushare'])
    b = st.median(r[k] for r in res['vde2'])
    print(f'| {name} | {a:.1f} | {b:.1f} | {a - b:+.1f} |')
EOF
