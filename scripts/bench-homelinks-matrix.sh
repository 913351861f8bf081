#!/usr/bin/env bash
# Home-links benchmark matrix (issue 16): for each cell (uplink, FIFO, sellers) runs
# cpushare (scripts/bench-swarm.sh, MODES=cpushare) and the BitTorrent anchors
# qBittorrent-nox and aria2c (../shared/bench/swarm-anchors.sh, one mode per call so
# that the seed's FIFO drops are per client) one after the other with the same knobs,
# and appends one line per run to $OUT/runs.tsv; `--report` prints the Markdown table.
#
# Every host (buyer/seed and sellers/peers) gets the same link: uplink UP, downlink
# 16 x UP (8 x for 50 Mbit/s), a byte FIFO under the HTB class of both directions.
# FIFO "10pkt" is QUEUE_MS=0: both scripts floor the FIFO at 15140 bytes, 10 full
# 1514-byte frames (so at 1 Mbit/s and below "100ms" is that floor too).
# Per run: last seller / Kumar-Ross bound, buyer (seed) wire bytes / image, packets
# the buyer's uplink FIFO dropped. Time limit per run: 5 x the bound, at least 120 s.
#
# Usage (root):  scripts/bench-homelinks-matrix.sh [CELL...]   # CELL = UP:FIFO:N,
#                  e.g. 8mbit:100ms:12 1mbit:10pkt:12 500kbit:1s:4 (FIFO: 10pkt|<n>ms|<n>s)
#                scripts/bench-homelinks-matrix.sh --report   # table from $OUT/runs.tsv
# Knobs (env):   FILE_MIB=16 NODE_BIN=target/release/cpushare-node OUT=/tmp/mx-results
#                CLIENTS="cpushare qbt aria2" PREFIX=mx- APREFIX=ma- WORK=/tmp/mx-swarm
#                AWORK=/tmp/ma ANCHORS=../shared/bench/swarm-anchors.sh NICE=10
# Needs: what bench-swarm.sh and swarm-anchors.sh need (aria2 qbittorrent-nox
# opentracker mktorrent transmission-cli ethtool jq curl iproute2 python3), and a
# node binary built first (cargo build --release -p node --bins).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
FILE_MIB=${FILE_MIB:-16}
NODE_BIN=${NODE_BIN:-$ROOT/target/release/cpushare-node}
OUT=${OUT:-/tmp/mx-results}
CLIENTS=${CLIENTS:-"cpushare qbt aria2"}
PREFIX=${PREFIX:-mx-}
APREFIX=${APREFIX:-ma-}
WORK=${WORK:-/tmp/mx-swarm}
AWORK=${AWORK:-/tmp/ma}
ANCHORS=${ANCHORS:-$ROOT/../shared/bench/swarm-anchors.sh}
NICE=${NICE:-10}
PY=/usr/bin/python3

report() {
"$PY" - "$OUT/runs.tsv" <<'PYEOF'
import sys, collections, re
cells = collections.OrderedDict()
for line in open(sys.argv[1]):
    f = line.rstrip("\n").split("\t")
    if len(f) < 17 or f[0] == "cell":
        continue
    (cell, up, down, fifo, n, mib, bound, limit, client, date, load, last, done,
     status, wire, payload, drops) = f[:17]
    cells.setdefault((cell, up, down, fifo, n, mib, bound), {})[client] = dict(
        date=date, load=load, last=last, done=done, status=status, limit=limit,
        wire=wire, payload=payload, drops=drops)
def ratio(r, bound):
    if r["status"] == "ok" and r["last"] not in ("", "-"):
        return float(r["last"].rstrip("+")) / bound
    return None
def time_cell(r, bound):
    x = ratio(r, bound)
    if x is not None:
        return f"{x:.2f} ({float(r['last']):.1f} s)"
    m = re.match(r"(\d+/\d+)(?:, peers got ([\d.]+) x N images)?", r["done"])
    if not m:
        return f"not finished at {r['limit']} s ({r['done']})"
    rx = f"; sellers received {m.group(2)} x N images on the wire" if m.group(2) else ""
    return f"not finished at {r['limit']} s ({m.group(1)} done{rx})"
print("| uplink / downlink | FIFO | sellers | bound (s) | last seller / bound: cpushare | qBittorrent | aria2c "
      "| buyer wire / image: cpushare | qBittorrent | aria2c | buyer FIFO drops: cpushare | qBittorrent | aria2c "
      "| load (1 min) at each start | targets met |")
print("|---|---|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|---|---|")
for (cell, up, down, fifo, n, mib, bound), runs in cells.items():
    bound = float(bound)
    Fb = int(mib) * 1048576
    cols_t, cols_w, cols_d, loads = [], [], [], []
    for c in ("cpushare", "qbt", "aria2"):
        r = runs.get(c)
        if r is None:
            cols_t.append("not run"); cols_w.append("-"); cols_d.append("-"); loads.append("-")
            continue
        cols_t.append(time_cell(r, bound))
        w = f"{int(r['wire']) / Fb:.3f}" if r["wire"].isdigit() else "-"
        if c == "cpushare" and r["payload"] not in ("", "-", "null"):
            w += f" (payload {int(r['payload']) / Fb:.3f})"
        cols_w.append(w)
        cols_d.append(r["drops"])
        loads.append(r["load"].split()[0] if r["load"] else "-")
    cs = runs.get("cpushare")
    verdict = "-"
    if cs is not None:
        x = ratio(cs, bound)
        xs = [ratio(runs[c], bound) for c in ("qbt", "aria2") if c in runs]
        wire_ok = cs["wire"].isdigit() and int(cs["wire"]) / Fb <= 1.10
        if x is None:
            verdict = "no (cpushare not finished)"
        else:
            why = []
            if x > 1.3: why.append("> 1.3 x bound")
            if len(xs) < 2: why.append("anchors missing")
            elif any(a is not None and x >= a for a in xs): why.append("not under both clients")
            if not wire_ok: why.append("wire > 1.10")
            verdict = "**yes**" if not why else "no: " + ", ".join(why)
    print(f"| {up} / {down} | {fifo} | {n} | {bound:.1f} | " + " | ".join(cols_t) + " | "
          + " | ".join(cols_w) + " | " + " | ".join(cols_d) + " | " + " / ".join(loads)
          + f" | {verdict} |")
PYEOF
}

if [ "${1:-}" = "--report" ]; then report; exit 0; fi
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
[ $# -gt 0 ] || { echo "usage: $0 UP:FIFO:N... | --report" >&2; exit 2; }
[ -x "$NODE_BIN" ] || { echo "no $NODE_BIN: build it first (or set NODE_BIN)" >&2; exit 1; }
[ -x "$ANCHORS" ] || [ -r "$ANCHORS" ] || { echo "no $ANCHORS" >&2; exit 1; }
mkdir -p "$OUT"
[ -s "$OUT/runs.tsv" ] || printf 'cell\tup\tdown\tfifo\tn\tfile_mib\tbound_s\tlimit_s\tclient\tdate\tload\tlast_s\tdone\tstatus\tbuyer_wire_B\tbuyer_payload_B\tbuyer_fifo_drops\n' > "$OUT/runs.tsv"
log() { echo "[$(date +%T)] $*" >&2; }

rate_bps() { awk -v s="$1" 'BEGIN{ s = tolower(s); m = 1
  if (s ~ /gbit$/) m = 1e9; else if (s ~ /mbit$/) m = 1e6; else if (s ~ /kbit$/) m = 1e3
  sub(/[a-z]+$/, "", s); printf "%d", s * m }'; }
fmt_rate() { awk -v b="$1" 'BEGIN{ if (b % 1000000 == 0) printf "%dmbit", b / 1e6; else printf "%dkbit", b / 1e3 }'; }

# every second while a run lasts: time, buyer/seed eth0 tx bytes, drops of its uplink
# FIFO, and every 5 s the peers' eth0 rx bytes summed ("-" between)
sample_loop() {
  local pre=$1 n=$2 f=$3 k=0 tx dr rx i
  while :; do
    if tx=$(ip -n "${pre}seed" -s -j link show dev eth0 2>/dev/null | jq '.[0].stats64.tx.bytes' 2>/dev/null) && [ -n "$tx" ]; then
      dr=$(tc -n "${pre}seed" -s -j qdisc show dev eth0 2>/dev/null |
        jq '[.[] | select(.kind == "bfifo" or .kind == "pfifo") | .drops] | add // 0' 2>/dev/null || echo 0)
      rx=-
      if [ $((k % 5)) = 0 ]; then
        rx=0
        for i in $(seq 1 "$n"); do
          rx=$((rx + $(ip -n "${pre}p$i" -s -j link show dev eth0 2>/dev/null | jq '.[0].stats64.rx.bytes' 2>/dev/null || echo 0)))
        done
      fi
      echo "$(date +%s.%N) $tx ${dr:-0} $rx" >> "$f"
      k=$((k + 1))
    fi
    sleep 1
  done
}

run_cell() {
  local spec=$1 up fifo n
  IFS=: read -r up fifo n <<<"$spec"
  [ -n "$up" ] && [ -n "$fifo" ] && [ -n "$n" ] || { echo "bad cell '$spec' (want UP:FIFO:N)" >&2; exit 2; }
  local ub db mult=16 qms down
  ub=$(rate_bps "$up"); [ "$ub" -gt 0 ] || { echo "bad uplink '$up'" >&2; exit 2; }
  [ "$ub" -ge 50000000 ] && mult=8
  db=$((ub * mult)); down=$(fmt_rate "$db"); up=$(fmt_rate "$ub")
  case $fifo in
    10pkt) qms=0 ;;
    *ms) qms=${fifo%ms} ;;
    *s) qms=$(( ${fifo%s} * 1000 )) ;;
    *) echo "bad FIFO '$fifo' (10pkt, <n>ms or <n>s)" >&2; exit 2 ;;
  esac
  local bound limit
  bound=$(awk -v f="$FILE_MIB" -v u="$ub" -v d="$db" -v n="$n" 'BEGIN{ F = f * 1048576 * 8
    b = F / u; if (F / d > b) b = F / d; if (n * F / (u + n * u) > b) b = n * F / (u + n * u); printf "%.1f", b }')
  limit=$(awk -v b="$bound" 'BEGIN{ t = int(5 * b + 0.999); if (t < 120) t = 120; print t }')
  local id="${up}-${fifo}-n${n}" c
  log "cell $id: down $down, QUEUE_MS=$qms, bound $bound s, limit $limit s"
  local knobs=(N="$n" FILE_MIB="$FILE_MIB" SEED_UP="$up" SEED_DOWN="$down" PEER_UP="$up" PEER_DOWN="$down" QUEUE_MS="$qms")
  for c in $CLIENTS; do
    local d="$OUT/$id/$c" load date rc=0
    rm -rf "$d"; mkdir -p "$d"
    load=$(cut -d' ' -f1-3 /proc/loadavg); date=$(date -u +%FT%TZ)
    uptime > "$d/uptime-start"
    log "  $c (load $load)"
    local pre=$PREFIX; [ "$c" = cpushare ] || pre=$APREFIX
    sample_loop "$pre" "$n" "$d/samples" &
    local spid=$! t_start; t_start=$(date +%s)
    if [ "$c" = cpushare ]; then
      # bench-swarm.sh waits TIMEOUT + 30 s for the fetches; the outer timeout is a backstop
      env "${knobs[@]}" MODES=cpushare REPEATS=1 TIMEOUT="$limit" NODE_BIN="$NODE_BIN" \
        WORK="$WORK" PREFIX="$PREFIX" timeout -s TERM $((limit + 300)) \
        nice -n "$NICE" "$ROOT/scripts/bench-swarm.sh" > "$d/report.md" 2> "$d/log" || rc=$?
      env N="$n" PREFIX="$PREFIX" WORK="$WORK" NODE_BIN="$NODE_BIN" "$ROOT/scripts/bench-swarm.sh" --cleanup || true
      cp "$WORK/results.tsv" "$d/results.tsv" 2>/dev/null || true
      [ -d "$WORK/run" ] && cp -a "$WORK/run" "$d/run"
    else
      env "${knobs[@]}" MODES="$c" REPEATS=1 BT_TIMEOUT="$limit" WORK="$AWORK" PREFIX="$APREFIX" \
        timeout -s TERM $((limit + 300)) nice -n "$NICE" bash "$ANCHORS" > "$d/report.md" 2> "$d/log" || rc=$?
      env N="$n" PREFIX="$APREFIX" WORK="$AWORK" bash "$ANCHORS" --cleanup || true
      cp "$AWORK/results.tsv" "$d/results.tsv" 2>/dev/null || true
      cp "$AWORK/seed-tc.txt" "$AWORK/versions.txt" "$d/" 2>/dev/null || true
      [ -d "$AWORK/run" ] && cp -a "$AWORK/run" "$d/run"
      rm -f "$AWORK/seed-tc.txt"
    fi
    kill "$spid" 2>/dev/null || true; wait "$spid" 2>/dev/null || true
    uptime > "$d/uptime-end"
    local last="" done="0/$n" status="failed(rc=$rc)" wire="-" payload="-" drops="-" line
    # peers' received wire bytes / (N x image) at the end (from the samples)
    local rxf
    rxf=$(awk -v n="$n" -v f="$FILE_MIB" 'NF >= 4 && $4 != "-" {r = $4} END {if (r != "") printf "%.2f", r / (n * f * 1048576); else print "-"}' "$d/samples" 2>/dev/null || echo -)
    if [ ! -s "$d/results.tsv" ] && [ "$c" != cpushare ] && [ -s "$d/samples" ]; then
      # swarm-anchors.sh ends without a result row when no peer finished (grep -v with no
      # match under pipefail): take the seed's wire bytes and FIFO drops from the samples
      # (last one before its namespace went, 1 s apart) and the done count from the hooks
      local k; k=$(find "$d/run" -maxdepth 2 -name 'p*.done' 2>/dev/null | wc -l)
      wire=$(awk 'NR == 1 {t0 = $2} {t = $2} END {printf "%d", t - t0}' "$d/samples")
      drops=$(awk 'NR == 1 {d0 = $3} {dd = $3} END {printf "%d", dd - d0}' "$d/samples")
      last=""; done="$k/$n"; status="no-row,rc=$rc"
      [ $(( $(date +%s) - t_start )) -ge "$limit" ] && status="timeout($k/$n),no-row,rc=$rc"
    elif [ -s "$d/results.tsv" ]; then
      # tabs to \037 first: a tab is IFS white space, so an empty field (no seller
      # done) would otherwise vanish and shift the rest
      line=$(tail -1 "$d/results.tsv" | tr '\t' '\037')
      IFS=$'\037' read -r _ _ last _ wire f6 _ status f9 <<<"$line"
      if [ "$c" = cpushare ]; then
        payload=$f6; drops=$f9
      elif [ -s "$d/seed-tc.txt" ]; then
        # the seed's uplink FIFO (bfifo under the HTB class), whole anchors run
        drops=$(awk '/^qdisc [bp]fifo/{f = 1; next} f && /dropped/{sub(/.*dropped /, ""); sub(/,.*/, ""); print; exit}' "$d/seed-tc.txt")
      fi
      case $status in
        ok) done="$n/$n" ;;
        timeout\(*) done=${status#timeout(}; done=${done%)} ;;
      esac
      [ "$rc" = 0 ] || status="$status,rc=$rc"
    fi
    [ "$done" = "$n/$n" ] || done="$done, peers got $rxf x N images"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$id" "$up" "$down" "$fifo" "$n" \
      "$FILE_MIB" "$bound" "$limit" "$c" "$date" "$load" "$last" "$done" "$status" "$wire" "$payload" "$drops" >> "$OUT/runs.tsv"
    log "  -> $c: last=${last:-none} ($done done, $status), buyer wire $wire B, FIFO drops $drops"
  done
}

for spec in "$@"; do run_cell "$spec"; done
report
