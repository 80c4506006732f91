#!/usr/bin/env bash
# Replication cost, measured: produce throughput and latency against a 3-node
# cluster (acks=all and acks=1, replication factor 3) and against a single node
# (acks=1), 1 and 3 partitions, all in one run, medians of RUNS runs each. Writes
# the "Cluster" section of BENCHMARKS.md (between its markers) and the raw JSON to
# target/bench-results/cluster/.
#
# Placement: this machine has 2 cores. The three nodes (one shard each) and the
# load generator share them and the one disk, so a cluster row measures three
# brokers' CPU and fsyncs on the resources one broker gets in a single-node row;
# the ratio to the single-node row in the same run is the figure to read.
#
# Usage: bench/run-cluster-bench.sh   (knobs: RUNS=3, DURATION=5, WARMUP=2, OUT;
#        REPORT_ONLY=1 rewrites the section from the last run's results)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RUNS="${RUNS:-3}"
DURATION="${DURATION:-5}"
WARMUP="${WARMUP:-2}"
OUT="${OUT:-$ROOT/BENCHMARKS.md}"
RESULTS="$ROOT/target/bench-results/cluster"
BIN="$ROOT/target/release"
command -v jq >/dev/null || { echo "needs jq (apt-get install jq)" >&2; exit 1; }
export SLUICE_BIN_DIR="$BIN" SLUICE_CLUSTER_DIR="$RESULTS/cluster-data" SLUICE_CLUSTER_PORT=19940
if [[ ${REPORT_ONLY:-0} != 1 ]]; then
cargo build --release --quiet -p sluice-broker -p sluice-tools -p sluice-bench --bins
rm -rf "$RESULTS"; mkdir -p "$RESULTS"

export SLUICE_BROKER_ARGS="--shards 1"
tools/cluster.sh up 3 >&2
CLUSTER=$(tools/cluster.sh brokers)
SINGLE_PORT=19990
"$BIN/sluice-broker" --data-dir "$RESULTS/single-data" --listen "127.0.0.1:$SINGLE_PORT" --shards 1 --admin-listen off \
  > "$RESULTS/single.log" 2>&1 &
SINGLE_PID=$!
trap 'tools/cluster.sh down >/dev/null 2>&1; kill $SINGLE_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do "$BIN/sluice" --brokers "127.0.0.1:$SINGLE_PORT" topic list >/dev/null 2>&1 && break; sleep 0.1; done

# CPU seconds (user + system) used so far by the processes in "$@".
cpu_seconds() {
  local total=0 pid ticks
  for pid in "$@"; do
    ticks=$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)
    total=$((total + ticks))
  done
  awk -v t="$total" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.3f", t / hz}'
}

# case NAME BROKERS PARTITIONS ACKS RF: RUNS runs; each run's broker CPU (cores:
# CPU seconds per wall second, all broker processes of the case) in NAME-N.cpu.
case_run() {
  local name=$1 brokers=$2 partitions=$3 acks=$4 rf=$5
  local pids
  if [[ $name == single-* ]]; then pids=$SINGLE_PID; else pids=$(cat "$SLUICE_CLUSTER_DIR/pids"); fi
  for run in $(seq 1 "$RUNS"); do
    local cpu0 t0 cpu1 t1
    cpu0=$(cpu_seconds $pids); t0=$(date +%s.%N)
    "$BIN/sluice-bench" produce --brokers "$brokers" --partitions "$partitions" --producers "$partitions" \
      --acks "$acks" --replication-factor "$rf" --duration "$DURATION" --warmup "$WARMUP" \
      --json "$RESULTS/$name-$run.json" > "$RESULTS/$name-$run.txt" 2>&1
    cpu1=$(cpu_seconds $pids); t1=$(date +%s.%N)
    awk -v a="$cpu0" -v b="$cpu1" -v s="$t0" -v e="$t1" 'BEGIN {printf "%.2f\n", (b - a) / (e - s)}' > "$RESULTS/$name-$run.cpu"
  done
}
CASES=(
  "single-1p-acks1 127.0.0.1:$SINGLE_PORT 1 1 1"
  "cluster-1p-acks1 $CLUSTER 1 1 3"
  "cluster-1p-acksall $CLUSTER 1 all 3"
  "single-3p-acks1 127.0.0.1:$SINGLE_PORT 3 1 1"
  "cluster-3p-acks1 $CLUSTER 3 1 3"
  "cluster-3p-acksall $CLUSTER 3 all 3"
)
for spec in "${CASES[@]}"; do
  # shellcheck disable=SC2086
  case_run $spec
  echo "done: ${spec%% *}" >&2
done
fi

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
stat() { # stat NAME JQ-PATH
  for f in "$RESULTS/$1"-*.json; do jq -r "$2" "$f"; done | median
}
row() { # row NAME LABEL COPIES
  local rate p50 p99 cores
  rate=$(stat "$1" '.cases[0].records_per_sec')
  p50=$(stat "$1" '.cases[0].latency_us.p50')
  p99=$(stat "$1" '.cases[0].latency_us.p99')
  cores=$(cat "$RESULTS/$1"-*.cpu | median)
  printf '| %s | %.0f | %.0f | %.1f | %.1f | %s |\n' "$2" "$rate" "$(awk -v r="$rate" -v c="$3" 'BEGIN {print r * c * 1024 / 1e6}')" \
    "$(echo "$p50" | awk '{print $1/1000}')" "$(echo "$p99" | awk '{print $1/1000}')" "$cores"
}
ratio() { # ratio A B : median(A)/median(B)
  local a b
  a=$(stat "$1" '.cases[0].records_per_sec')
  b=$(stat "$2" '.cases[0].records_per_sec')
  awk -v a="$a" -v b="$b" 'BEGIN {printf "%.2f", a/b}'
}
wal_range() { # min-max of the rows' WAL MB/s
  local name copies rate
  for name in single-1p-acks1 cluster-1p-acks1 cluster-1p-acksall single-3p-acks1 cluster-3p-acks1 cluster-3p-acksall; do
    copies=3; [[ $name == single-* ]] && copies=1
    rate=$(stat "$name" '.cases[0].records_per_sec')
    awk -v r="$rate" -v c="$copies" 'BEGIN {printf "%.0f\n", r * c * 1024 / 1e6}'
  done | sort -n | awk 'NR == 1 {min = $1} {max = $1} END {print min "-" max}'
}
COMMIT=$(git rev-parse --short HEAD)
SECTION=$(cat <<EOF
<!-- cluster:begin (bench/run-cluster-bench.sh) -->
## Cluster: replication cost (3 nodes on this 2-core machine)

Generated by \`bench/run-cluster-bench.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'), commit \`$COMMIT\`, medians of $RUNS runs,
$DURATION s measured after $WARMUP s warm-up; 1 KiB records, 100-record batches, one producer per partition,
5 batches in flight per partition. **Durability:** acks=1: after \`fdatasync\` of the leader's WAL;
acks=all: after \`fdatasync\` on a majority of the three replicas (the leader's own write counted once durable).

**Placement:** three nodes (\`--shards 1\` each), the load generator and, in the single-node rows, one
broker all run on the same 2 cores and one virtual disk, unpinned. A cluster row therefore pays for three
brokers' CPU, three WAL writes and the replication traffic out of what one broker has in a single-node
row: read the ratios, which are of the same run, not the absolute numbers.

"WAL MB/s" is what the disk takes: records/s × 1 KiB × the replicas that write each record (all on
this one disk). "broker cores" is the CPU of every broker process of the case per wall second.

| case | records/s | WAL MB/s (all replicas) | p50 ms | p99 ms | broker cores |
|---|---:|---:|---:|---:|---:|
$(row single-1p-acks1 "single node, 1 partition, acks=1" 1)
$(row cluster-1p-acks1 "3 nodes, RF 3, 1 partition, acks=1" 3)
$(row cluster-1p-acksall "3 nodes, RF 3, 1 partition, acks=all" 3)
$(row single-3p-acks1 "single node, 3 partitions, acks=1" 1)
$(row cluster-3p-acks1 "3 nodes, RF 3, 3 partitions, acks=1" 3)
$(row cluster-3p-acksall "3 nodes, RF 3, 3 partitions, acks=all" 3)

Every row moves its "WAL MB/s" through the one disk (write + \`fdatasync\`); when
they are about equal across rows, as in this run ($(wal_range) MB/s), the shared disk is the limit and a
3-replica cluster on one machine can only reach a third of a single node, whatever the acks.

Ratios (same run): 1 partition acks=all / single node = $(ratio cluster-1p-acksall single-1p-acks1)×,
acks=all / acks=1 on the cluster = $(ratio cluster-1p-acksall cluster-1p-acks1)×; 3 partitions acks=all / single node =
$(ratio cluster-3p-acksall single-3p-acks1)×. Reproduce: \`bench/run-cluster-bench.sh\`.
<!-- cluster:end -->
EOF
)
if grep -q '<!-- cluster:begin' "$OUT"; then
  awk -v section="$SECTION" '
    /<!-- cluster:begin/ {print section; skip=1; next}
    /<!-- cluster:end -->/ {skip=0; next}
    !skip {print}' "$OUT" > "$OUT.tmp" && mv "$OUT.tmp" "$OUT"
else
  printf '\n%s\n' "$SECTION" >> "$OUT"
fi
echo "wrote the cluster section of $OUT" >&2
