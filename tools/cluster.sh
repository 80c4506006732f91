#!/usr/bin/env bash
# A Sluice cluster on this machine, for trying things out and for tests.
#
#   tools/cluster.sh up [N]     start N nodes (default 3) in the background
#   tools/cluster.sh down       stop them (SIGTERM, then SIGKILL after 10 s)
#   tools/cluster.sh status     `sluice cluster status` against the nodes
#   tools/cluster.sh brokers    print the --brokers list
#
# Node i listens for clients on 127.0.0.1:$((BASE_PORT + i)) and for peers on
# 127.0.0.1:$((BASE_PORT + 100 + i)); its data and log are in $DIR/node-i/. The
# defaults (BASE_PORT=9440, DIR=./cluster-data) can be changed with
# SLUICE_CLUSTER_PORT and SLUICE_CLUSTER_DIR; SLUICE_BIN_DIR picks the binaries
# (default: target/release, else target/debug; built if missing); extra broker
# flags go in SLUICE_BROKER_ARGS (e.g. "--shards 1").
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
base_port=${SLUICE_CLUSTER_PORT:-9440}
dir=${SLUICE_CLUSTER_DIR:-$PWD/cluster-data}
pids="$dir/pids"

bin_dir() {
  if [ -n "${SLUICE_BIN_DIR:-}" ]; then echo "$SLUICE_BIN_DIR"; return; fi
  for profile in release debug; do
    if [ -x "$root/target/$profile/sluice-broker" ] && [ -x "$root/target/$profile/sluice" ]; then
      echo "$root/target/$profile"; return
    fi
  done
  echo "cluster.sh: building the binaries (cargo build --release)" >&2
  (cd "$root" && cargo build --release --quiet -p sluice-broker -p sluice-tools --bins)
  echo "$root/target/release"
}

brokers() {
  local n=$1 list=""
  for i in $(seq 1 "$n"); do list="${list:+$list,}127.0.0.1:$((base_port + i))"; done
  echo "$list"
}

count() {
  [ -f "$dir/size" ] && cat "$dir/size" || echo 3
}

up() {
  local n=${1:-3}
  if [ "$n" -lt 1 ] || [ "$n" -gt 9 ]; then echo "cluster.sh: 1 to 9 nodes" >&2; exit 2; fi
  if [ -f "$pids" ] && kill -0 $(cat "$pids") 2>/dev/null; then
    echo "cluster.sh: a cluster is already running (tools/cluster.sh down first)" >&2; exit 1
  fi
  local bin; bin=$(bin_dir)
  mkdir -p "$dir"; : > "$pids"; echo "$n" > "$dir/size"
  local peers=""
  for i in $(seq 1 "$n"); do peers="${peers:+$peers,}$i=127.0.0.1:$((base_port + 100 + i))"; done
  for i in $(seq 1 "$n"); do
    mkdir -p "$dir/node-$i"
    # shellcheck disable=SC2086
    "$bin/sluice-broker" --node-id "$i" --data-dir "$dir/node-$i/data" \
      --listen "127.0.0.1:$((base_port + i))" --peer-listen "127.0.0.1:$((base_port + 100 + i))" \
      --admin-listen "127.0.0.1:$((base_port + 200 + i))" \
      --peers "$peers" ${SLUICE_BROKER_ARGS:-} >> "$dir/node-$i/broker.log" 2>&1 &
    echo $! >> "$pids"
  done
  # Ready when every node answers and the controller has a leader.
  for _ in $(seq 1 150); do
    if "$bin/sluice" --brokers "$(brokers "$n")" cluster status --format json 2>/dev/null \
        | grep -q '"controller":[1-9]'; then
      echo "cluster of $n node(s) up; --brokers $(brokers "$n")  (logs: $dir/node-*/broker.log)"
      return
    fi
    sleep 0.2
  done
  echo "cluster.sh: the cluster did not elect a controller within 30 s; see $dir/node-*/broker.log" >&2
  exit 1
}

down() {
  [ -f "$pids" ] || { echo "cluster.sh: no cluster running"; return; }
  local list; list=$(cat "$pids")
  kill $list 2>/dev/null || true
  for _ in $(seq 1 100); do
    kill -0 $list 2>/dev/null || break
    sleep 0.1
  done
  kill -9 $list 2>/dev/null || true
  rm -f "$pids"
  echo "cluster stopped"
}

case "${1:-}" in
  up) up "${2:-3}" ;;
  down) down ;;
  status) "$(bin_dir)/sluice" --brokers "$(brokers "$(count)")" cluster status ;;
  brokers) brokers "$(count)" ;;
  *) sed -n 2,14p "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
