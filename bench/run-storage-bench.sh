#!/usr/bin/env bash
# Storage benchmark: device ceilings measured with fio on the filesystem that holds
# the workspace's target/ directory, then the Sluice WAL criterion bench
# (bench/benches/wal.rs) on the same filesystem; writes a markdown section with the
# figures side by side to target/bench-results/storage.md (or $OUT);
# bench/run-all.sh merges it into BENCHMARKS.md.
#
# Usage: bench/run-storage-bench.sh            (as root: installs fio/jq if missing)
# Knobs: FIO_SECS (default 4), FIO_SIZE_MIB (default 1024), OUT, and the bench's own
#        SLUICE_BENCH_MEASURE_SECS / SLUICE_BENCH_RECOVERY_MIB.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/target/bench-results/storage.md}"
FIO_SECS="${FIO_SECS:-4}"
FIO_SIZE_MIB="${FIO_SIZE_MIB:-1024}"
WORK="$ROOT/target/bench-fio"
BENCH_LOG="$WORK/cargo-bench-wal.log"

log() { printf '== %s\n' "$*" >&2; }

need() {
    local command=$1 package=$2
    if ! command -v "$command" >/dev/null 2>&1; then
        log "installing $package"
        apt-get update -qq && apt-get install -y -qq "$package"
    fi
}
need fio fio
need jq jq

rm -rf "$WORK"
mkdir -p "$WORK" "$(dirname "$OUT")"
trap 'rm -f "$WORK"/*.dat' EXIT

ZERO_FILE="$WORK/zero.dat"
FALLOC_FILE="$WORK/falloc.dat"

# A zero-filled file, written with direct I/O and synced: the state Sluice's
# segments are in before use.
prewrite() {
    log "zero-filling $ZERO_FILE (${FIO_SIZE_MIB} MiB)"
    dd if=/dev/zero of="$ZERO_FILE" bs=1M count="$FIO_SIZE_MIB" oflag=direct conv=fsync status=none
}

declare -a FIO_COMMANDS=()

# run_fio NAME ARGS...: runs fio, keeps its JSON in $WORK/NAME.json.
run_fio() {
    local name=$1
    shift
    local -a command=(fio --name="$name" --size="${FIO_SIZE_MIB}M" --time_based --runtime="$FIO_SECS" --ramp_time=1
        --output-format=json --output="$WORK/$name.json" "$@")
    log "${command[*]}"
    FIO_COMMANDS+=("${command[*]}")
    "${command[@]}"
}

# fio_value NAME JQ-EXPRESSION (on jobs[0])
fio_value() {
    jq -r ".jobs[0] | $2" "$WORK/$1.json"
}

prewrite
for bs in 4k 16k 256k 1M; do
    run_fio "seqwrite-direct-$bs" --filename="$ZERO_FILE" --rw=write --bs="$bs" --direct=1 --ioengine=io_uring --iodepth=8
done
for bs in 4k 16k 256k; do
    run_fio "write-fdatasync-$bs" --filename="$ZERO_FILE" --rw=write --bs="$bs" --direct=1 --ioengine=psync --fdatasync=1
done
# Same, buffered (page cache) writes: the usual way a Kafka-like broker syncs.
run_fio "write-fdatasync-buffered-4k" --filename="$ZERO_FILE" --rw=write --bs=4k --direct=0 --ioengine=psync --fdatasync=1
# Why segments are zero-filled rather than fallocated (docs/storage.md).
rm -f "$FALLOC_FILE"
fallocate -l "${FIO_SIZE_MIB}M" "$FALLOC_FILE"
run_fio "write-fdatasync-fallocated-4k" --filename="$FALLOC_FILE" --rw=write --bs=4k --direct=1 --ioengine=psync --fdatasync=1
rm -f "$FALLOC_FILE"
# Reads for the recovery ratio: 1 MiB at depth 8, and what the recovery scan issues
# (8 MiB reads, one at a time).
run_fio "seqread-direct-1M" --filename="$ZERO_FILE" --rw=read --bs=1M --direct=1 --ioengine=io_uring --iodepth=8
run_fio "seqread-direct-8M-qd1" --filename="$ZERO_FILE" --rw=read --bs=8M --direct=1 --ioengine=psync
rm -f "$ZERO_FILE"

BENCH_COMMAND="cargo bench -p sluice-bench --bench wal"
log "$BENCH_COMMAND"
(cd "$ROOT" && $BENCH_COMMAND) 2>&1 | tee "$BENCH_LOG" >&2
grep '^SLUICE_BENCH ' "$BENCH_LOG" >"$WORK/sluice.txt" || { log "no SLUICE_BENCH lines in $BENCH_LOG"; exit 1; }

# sluice_value KIND KEY [FILTER...]: a field of the SLUICE_BENCH line of KIND whose
# fields include every FILTER (key=value).
sluice_value() {
    local kind=$1 key=$2
    shift 2
    local line
    line=$(grep "^SLUICE_BENCH $kind " "$WORK/sluice.txt" | while read -r candidate; do
        local ok=1
        for filter in "$@"; do [[ " $candidate " == *" $filter "* ]] || ok=0; done
        if [[ $ok == 1 ]]; then echo "$candidate"; fi
    done | head -n 1)
    [[ -n $line ]] || { echo "missing SLUICE_BENCH $kind $*" >&2; exit 1; }
    tr ' ' '\n' <<<"$line" | sed -n "s/^$key=//p"
}

mbps() { awk -v b="$1" 'BEGIN { printf "%.0f", b / 1e6 }'; }
num() { awk -v x="$1" 'BEGIN { printf "%.0f", x }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "n/a" }'; }
human_bs() { case $1 in 1024) echo 1k ;; 16384) echo 16k ;; 262144) echo 256k ;; *) echo "$1" ;; esac; }
fio_bs() { case $1 in 1024) echo 4k ;; 16384) echo 16k ;; 262144) echo 256k ;; *) echo "$1" ;; esac; }

FS_LINE=$(df -T "$ROOT/target" | tail -n 1)
FS_TYPE=$(awk '{print $2}' <<<"$FS_LINE")
FS_DEVICE=$(awk '{print $1}' <<<"$FS_LINE")
CPU_MODEL=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
COMMIT=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=$(cd "$ROOT" && { git diff --quiet HEAD 2>/dev/null && echo "" || echo " (with uncommitted changes)"; })

FDS_4K_IOPS=$(fio_value write-fdatasync-4k '.write.iops')
APPENDS_64x1K=$(sluice_value wal_append appends_per_sec appenders=64 batch_bytes=1024)
RECOVERY_BPS=$(sluice_value wal_recovery bytes_per_sec)
READ_1M_BPS=$(fio_value seqread-direct-1M '.read.bw_bytes')
READ_8M_BPS=$(fio_value seqread-direct-8M-qd1 '.read.bw_bytes')
GOAL=$(awk -v r="$(ratio "$APPENDS_64x1K" "$FDS_4K_IOPS")" 'BEGIN { print (r >= 10 ? "met" : "NOT met") }')

{
    echo "## Storage: WAL durable append and recovery vs. device ceilings"
    echo
    echo "Generated by \`bench/run-storage-bench.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'), commit \`$COMMIT\`$DIRTY."
    echo
    echo "**Machine:** $(nproc) CPUs ($CPU_MODEL), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM,"
    echo "Linux $(uname -r); filesystem \`$FS_TYPE\` on \`$FS_DEVICE\` (the workspace's \`target/\`, where both fio and the bench write)."
    echo
    echo "**Durability mode:** every append is acknowledged only after an \`fdatasync\` that started after its"
    echo "O_DIRECT write completed has returned (group commit: one \`fdatasync\` covers every append written"
    echo "while the previous one was in flight). The bench opens \`Wal\` with 256 MiB zero-filled segments"
    echo "(production default 1 GiB), a 64 MiB tail cache, one glommio executor pinned to CPU 0, no busy polling;"
    echo "N appender tasks each loop \`append\` of one single-record batch to their own log."
    echo "Segment rolls (with the background zero-fill of the next segment) happen inside the timed runs."
    echo "MB = 10^6 bytes."
    echo
    echo "### Headline"
    echo
    echo "| figure | Sluice | fio ceiling | ratio |"
    echo "|---|---:|---:|---:|"
    echo "| durable appends/s, 64 appenders x 1 KiB vs. 4 KiB O_DIRECT write+fdatasync IOPS (goal >= 10x: **$GOAL**) | $(num "$APPENDS_64x1K") | $(num "$FDS_4K_IOPS") | $(ratio "$APPENDS_64x1K" "$FDS_4K_IOPS") |"
    for bs in 1024 16384 262144; do
        b=$(sluice_value wal_append bytes_per_sec appenders=64 batch_bytes=$bs)
        f=$(fio_value "seqwrite-direct-$(fio_bs $bs)" '.write.bw_bytes')
        echo "| durable append MB/s, 64 appenders x $(human_bs $bs) vs. O_DIRECT seq write MB/s, bs $(fio_bs $bs), QD 8 | $(mbps "$b") | $(mbps "$f") | $(ratio "$b" "$f") |"
    done
    echo "| recovery scan MB/s (no checkpoint) vs. O_DIRECT seq read MB/s, bs 1M, QD 8 | $(mbps "$RECOVERY_BPS") | $(mbps "$READ_1M_BPS") | $(ratio "$RECOVERY_BPS" "$READ_1M_BPS") |"
    echo "| recovery scan MB/s (no checkpoint) vs. O_DIRECT seq read MB/s, bs 8M, QD 1 (the scan's pattern) | $(mbps "$RECOVERY_BPS") | $(mbps "$READ_8M_BPS") | $(ratio "$RECOVERY_BPS" "$READ_8M_BPS") |"
    echo
    echo "### Durable append, full matrix"
    echo
    echo "fio columns use the same write size (4k for 1 KiB batches: direct I/O cannot write less than a block,"
    echo "and Sluice's writes are whole 4 KiB blocks too). \"write+fdatasync\" is fio \`--direct=1 --ioengine=psync --fdatasync=1\`"
    echo "(one write then one \`fdatasync\`, queue depth 1): what a log without group commit achieves."
    echo
    echo "| appenders | batch | Sluice MB/s | appends/s | fdatasync/s | appends per fdatasync | mean fdatasync µs | mean write KiB | fio O_DIRECT seq write MB/s | ratio | fio write+fdatasync MB/s | ratio |"
    echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for bs in 1024 16384 262144; do
        fw=$(fio_value "seqwrite-direct-$(fio_bs $bs)" '.write.bw_bytes')
        fs=$(fio_value "write-fdatasync-$(fio_bs $bs)" '.write.bw_bytes')
        for n in 1 8 64; do
            v() { sluice_value wal_append "$1" appenders=$n batch_bytes=$bs; }
            b=$(v bytes_per_sec)
            writes=$(v writes_per_sec)
            write_kib=$(awk -v b="$b" -v w="$writes" 'BEGIN { if (w > 0) printf "%.1f", b / w / 1024; else print "n/a" }')
            echo "| $n | $(human_bs $bs) | $(mbps "$b") | $(num "$(v appends_per_sec)") | $(num "$(v syncs_per_sec)") | $(v appends_per_sync) | $(v mean_sync_us) | $write_kib | $(mbps "$fw") | $(ratio "$b" "$fw") | $(mbps "$fs") | $(ratio "$b" "$fs") |"
        done
    done
    echo
    echo "### Device ceilings (fio)"
    echo
    echo "| job | bs | MB/s | IOPS | mean fdatasync µs |"
    echo "|---|---:|---:|---:|---:|"
    for job in seqwrite-direct-4k seqwrite-direct-16k seqwrite-direct-256k seqwrite-direct-1M \
        write-fdatasync-4k write-fdatasync-16k write-fdatasync-256k write-fdatasync-buffered-4k write-fdatasync-fallocated-4k \
        seqread-direct-1M seqread-direct-8M-qd1; do
        dir=write
        [[ $job == seqread* ]] && dir=read
        sync_us=$(fio_value "$job" '(.sync.lat_ns.mean // 0) / 1000 | floor')
        [[ $sync_us == 0 ]] && sync_us="-"
        echo "| $job | $(fio_value "$job" '.["job options"].bs') | $(mbps "$(fio_value "$job" ".$dir.bw_bytes")") | $(num "$(fio_value "$job" ".$dir.iops")") | $sync_us |"
    done
    echo
    ZF=$(fio_value write-fdatasync-4k '.write.iops')
    FA=$(fio_value write-fdatasync-fallocated-4k '.write.iops')
    echo "Zero-filled vs. fallocated target, 4 KiB O_DIRECT write+fdatasync: $(num "$ZF")/s vs. $(num "$FA")/s ($(ratio "$ZF" "$FA")x)."
    echo
    echo "### Recovery"
    echo
    echo "\`Wal::open\` of a WAL holding $(( $(sluice_value wal_recovery bytes) >> 20 )) MiB of 16 KiB batches over 64 logs"
    echo "($(sluice_value wal_recovery segments) segment files of 256 MiB including the spare), with the checkpoint deleted so that"
    echo "every frame is read and both CRCs verified: $(mbps "$RECOVERY_BPS") MB/s of frames,"
    echo "$(sluice_value wal_recovery seconds_per_gib) s per GiB. The timing covers the whole \`open\`, including the zeroing check of"
    echo "\`RECOVERY_ZERO_BYTES\` after the end of every scanned segment."
    echo
    echo "### Commands"
    echo
    echo '```sh'
    echo "dd if=/dev/zero of=target/bench-fio/zero.dat bs=1M count=$FIO_SIZE_MIB oflag=direct conv=fsync"
    echo "fallocate -l ${FIO_SIZE_MIB}M target/bench-fio/falloc.dat"
    for command in "${FIO_COMMANDS[@]}"; do
        echo "${command//"$ROOT"\//}"
    done
    echo "$BENCH_COMMAND"
    echo '```'
    echo
    echo "Raw SLUICE_BENCH lines:"
    echo
    echo '```text'
    cat "$WORK/sluice.txt"
    echo '```'
} >"$OUT"

log "wrote $OUT"
