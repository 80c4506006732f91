#!/usr/bin/env bash
# Start-up time, disk use and fdatasync latency of an empty broker, for this build
# and (optionally) an older one, measured in the same run, interleaved, medians of
# RUNS runs. Prints a markdown table (BENCHMARKS.md, storage section).
#
#   bash bench/run-startup-bench.sh                       # this build only
#   BEFORE=../old/target/release bash bench/run-startup-bench.sh
#
# An older build: `git worktree add ../old <commit> && (cd ../old && cargo build
# --release -p sluice-broker -p sluice-bench)`.
#
# Each run: a fresh data dir under target/ (a real filesystem), the broker with its
# defaults (1 GiB segments, 2 shards) started by exec; "listening" is the first
# successful TCP connect (the broker binds only after its WAL is open); disk is `du`
# of the data dir 2 s later; then SIGTERM and a second start on the same dir.
# fdatasync latency: `sluice-bench wal` with one appender of 4 KiB batches, every
# append durable before the next (so each append is one write + one fdatasync),
# 1 GiB segments: p50 and p99 over 5 s.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
RUNS=${RUNS:-3}
AFTER=${AFTER:-$root/target/release}
BEFORE=${BEFORE:-}
if [ ! -x "$AFTER/sluice-broker" ] || [ ! -x "$AFTER/sluice-bench" ]; then
  cargo build --release -p sluice-broker -p sluice-bench >&2
fi
work="$root/target/startup-bench"
rm -rf "$work" && mkdir -p "$work"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Starts the broker and sets $elapsed to the ms from exec until a TCP connect
# succeeds; the broker keeps running (pid in $pid). Not run in a subshell: the
# broker must be this shell's child, and must not hold a command substitution's
# pipe open.
start_and_time() {
  local bin=$1 data=$2 port=$3
  local t0 t1
  t0=$(date +%s%N)
  "$bin/sluice-broker" --data-dir "$data" --listen "127.0.0.1:$port" --shards 2 >/dev/null 2>>"$work/broker.log" &
  pid=$!
  until python3 -c "import socket,sys; s=socket.socket(); s.settimeout(0.2); sys.exit(s.connect_ex(('127.0.0.1',$port)))" 2>/dev/null; do
    sleep 0.005
    if ! kill -0 "$pid" 2>/dev/null; then echo "broker exited; see $work/broker.log" >&2; exit 1; fi
  done
  t1=$(date +%s%N)
  elapsed=$(( (t1 - t0) / 1000000 ))
}

disk_mib() { du -sk "$1" | awk '{printf "%.0f", $1/1024}'; }

one_run() {
  local label=$1 bin=$2 n=$3
  local data="$work/$label-$n/data" port
  port=$(free_port)
  start_and_time "$bin" "$data" "$port"; first=$elapsed
  sleep 2
  first_disk=$(disk_mib "$data")
  kill -TERM "$pid"; wait "$pid" || true
  start_and_time "$bin" "$data" "$port"; second=$elapsed
  sleep 2
  second_disk=$(disk_mib "$data")
  kill -TERM "$pid"; wait "$pid" || true
  latency=$("$bin/sluice-bench" wal --appenders 1 --batch-bytes 4096 --records 1 --duration 5 --warmup 1 \
    --segment-mib 1024 --dir "$work/$label-$n/wal" | awk '/append latency us:/ {print $5, $9}')
  rm -rf "$work/$label-$n"
  echo "$label $first $first_disk $second $second_disk $latency" >> "$work/results.txt"
}

for n in $(seq 1 "$RUNS"); do
  [ -n "$BEFORE" ] && one_run before "$BEFORE" "$n"
  one_run after "$AFTER" "$n"
done

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
row() {
  local label=$1 name=$2
  local col
  printf '| %s ' "$name"
  for col in 2 3 4 5 6 7; do
    printf '| %s ' "$(awk -v l="$label" -v c="$col" '$1==l {print $c}' "$work/results.txt" | median)"
  done
  printf '|\n'
}
echo "| build | first start: ms to listen | disk MiB | restart: ms to listen | disk MiB | 4 KiB append+fdatasync p50 µs | p99 µs |"
echo "|---|---:|---:|---:|---:|---:|---:|"
[ -n "$BEFORE" ] && row before "before ($BEFORE)"
row after "this build"
echo
echo "Medians of $RUNS runs, interleaved; empty broker, 2 shards, default 1 GiB segments; durable (fdatasync before ack)."
