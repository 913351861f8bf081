# Helpers shared by the benchmark scripts that build hosts in network namespaces
# (bench-swarm.sh, bench-owner-link.sh). Sourced; expects QUEUE_MS (the FIFO under an
# HTB-shaped link, ms), a PIDS array, and optionally CC (TCP congestion control per host).

log() { echo "[$(date +%T)] $*" >&2; }
ns_exists() { ip netns list 2>/dev/null | awk -v n="$1" '$1 == n {f = 1} END {exit !f}'; }
nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
mkns() {
  ip netns add "$1"
  nsx "$1" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
  # TCP congestion control in every host (per namespace); empty: the kernel's default
  if [ -n "${CC:-}" ]; then nsx "$1" sysctl -qw net.ipv4.tcp_congestion_control="$CC"; fi
  ip -n "$1" link set lo up
}
rate_bps() { awk -v s="$1" 'BEGIN{ s = tolower(s); m = 1
  if (s ~ /gbit$/) m = 1e9; else if (s ~ /mbit$/) m = 1e6; else if (s ~ /kbit$/) m = 1e3
  sub(/[a-z]+$/, "", s); printf "%d", s * m }'; }
shape() {
  local ns=$1 dev=$2 rate=$3 qb
  qb=$(( $(rate_bps "$rate") / 8 * QUEUE_MS / 1000 )); [ "$qb" -lt 15140 ] && qb=15140
  nsx "$ns" ethtool -K "$dev" tso off gso off gro off >/dev/null 2>&1 || true
  tc -n "$ns" qdisc add dev "$dev" root handle 1: htb default 10
  tc -n "$ns" class add dev "$dev" parent 1: classid 1:10 htb rate "$rate" ceil "$rate" quantum 1514
  tc -n "$ns" qdisc add dev "$dev" parent 1:10 handle 10: bfifo limit "$qb"
}
wait_for() {
  local to=$1 what=$2; shift 2
  local end=$(( $(date +%s) + to ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -ge "$end" ] && { log "timeout waiting for $what"; return 1; }
    sleep 0.2
  done
}
start_bg() { local ns=$1 lf=$2; shift 2; ip netns exec "$ns" "$@" >"$lf" 2>&1 & PIDS+=($!); }
