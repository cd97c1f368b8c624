#!/usr/bin/env bash
# Benchmarks stord's qcow2 disks against qemu-nbd serving the same chain, in one
# run: linked clone creation of a 20 GiB base (stord `disk clone` through the
# CLI, against `qemu-img create -b`), nbdcopy sequential read of a clone whose
# first half is in its overlay and second half in the base, fio 4 KiB randread
# on that clone and randwrite (allocating: a fresh clone per run) at QD1 and
# QD32. Also stord reading its raw base the same way, for the "chain read
# >= 0.8x raw" goal. Goals (issue 15): clone < 50 ms, every figure >= 1.5x
# qemu-nbd, chain seq read >= 0.8x stord raw.
#
# Usage: bench/stord-qcow2.sh [SIZE_MIB [FIO_SECONDS [REPS]]]  (defaults 1024 4 3)
# Needs qemu-img, qemu-nbd, nbdcopy, nbdinfo, fio, python3; builds stord.
# Each figure is the median of REPS runs, the two servers taking turns.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE_MIB=${1:-1024}
FIO_SECS=${2:-4}
REPS=${3:-3}
WORK_PREFIX=stord-qcow2-bench
. bench/stord-common.sh
median() { python3 -c 'import sys, statistics; print(round(statistics.median(float(x) for x in sys.argv[1:]), 1))' "$@"; }

port=$(free_port)
cat > "$work/stord.toml" <<EOT
listen = "127.0.0.1:$port"
control = "$work/control.sock"
state_dir = "$work/state"
EOT
start_stord() {
  "$STORD" serve --config "$work/stord.toml" 2>>"$work/stord.log" &
  pids+=($!); STORD_PID=$!
  for _ in $(seq 100); do [ -S "$work/control.sock" ] && break; sleep 0.1; done
}
stop_stord() { kill "$STORD_PID"; wait "$STORD_PID" || true; rm -f "$work/control.sock"; }
cli() { "$STORD" disk "$@" --control "$work/control.sock" >/dev/null; }
DISKS=$work/state/disks

# The bases: SIZE_MIB of random data (raw), and a sparse 20 GiB one.
head -c "${SIZE_MIB}M" /dev/urandom > "$work/base.raw"
truncate -s 20G "$work/big.raw"
start_stord
cli import golden --from "$work/base.raw" --format raw
cli import big --from "$work/big.raw" --format raw

# Clone creation: stord (the CLI's whole round trip) and qemu-img create.
declare -A S
for i in $(seq "$REPS"); do
  t0=$(now); cli clone big "c$i"; t1=$(now)
  S[stord,clone]+="$(python3 -c "print(($t1-$t0)*1000)") "
  t0=$(now); qemu-img create -q -f qcow2 -F raw -b "$work/big.raw" "$work/q$i.qcow2"; t1=$(now)
  S[qemu,clone]+="$(python3 -c "print(($t1-$t0)*1000)") "
done

# The read clone: first half written through stord (in the overlay).
cli clone golden vm
half=$((SIZE_MIB / 2))
head -c "${half}M" /dev/urandom > "$work/half.bin"
nbdcopy --flush "$work/half.bin" "nbd://127.0.0.1:$port/vm"
stop_stord
sync

qport=$(free_port)
QURI="nbd://127.0.0.1:$qport/vm"
SURI="nbd://127.0.0.1:$port/vm"
RAW="nbd://127.0.0.1:$port/golden"
run_qemu() {  # FILE: qemu-nbd on it (cache and aio as qemu-nbd's defaults)
  qemu-nbd -f qcow2 -x vm -p "$qport" -t --shared=8 "$1" 2>>"$work/qemu.log" &
  pids+=($!); QEMU_PID=$!; wait_port "$QURI"
}
stop_qemu() { kill "$QEMU_PID"; wait "$QEMU_PID" || true; }
copy_read() { local t0 t1; t0=$(now); nbdcopy --no-extents "$1" null: ; t1=$(now); python3 -c "print($SIZE_MIB/($t1-$t0))"; }
fio_iops() {  # URI RW QD
  fio --name=b --ioengine=nbd --uri="$1" --rw="$2" --bs=4k --iodepth="$3" \
    --size="${SIZE_MIB}M" --runtime="$FIO_SECS" --time_based --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; d=sys.stdin.read(); j=json.loads(d[d.index("{"):])["jobs"][0]; print(int(j["read"]["iops"]+j["write"]["iops"]))'
}
fresh_clone() {  # stord: a new clone "w"; qemu: a new overlay file
  cli delete w 2>/dev/null || true; cli clone golden w
  rm -f "$work/w.qcow2"; qemu-img create -q -f qcow2 -F raw -b "$DISKS/golden.img" "$work/w.qcow2"
}

for i in $(seq "$REPS"); do
  start_stord; wait_port "$SURI"
  S[stord,seq]+="$(copy_read "$SURI") "
  S[raw,seq]+="$(copy_read "$RAW") "
  S[stord,rr1]+="$(fio_iops "$SURI" randread 1) "
  S[stord,rr32]+="$(fio_iops "$SURI" randread 32) "
  fresh_clone; S[stord,rw1]+="$(fio_iops "nbd://127.0.0.1:$port/w" randwrite 1) "
  fresh_clone; S[stord,rw32]+="$(fio_iops "nbd://127.0.0.1:$port/w" randwrite 32) "
  fresh_clone
  stop_stord
  run_qemu "$DISKS/vm.img"
  S[qemu,seq]+="$(copy_read "$QURI") "
  S[qemu,rr1]+="$(fio_iops "$QURI" randread 1) "
  S[qemu,rr32]+="$(fio_iops "$QURI" randread 32) "
  stop_qemu
  for qd in 1 32; do
    rm -f "$work/w.qcow2"; qemu-img create -q -f qcow2 -F raw -b "$DISKS/golden.img" "$work/w.qcow2"
    run_qemu "$work/w.qcow2"; S[qemu,rw$qd]+="$(fio_iops "$QURI" randwrite "$qd") "; stop_qemu
  done
done

printf '\nstord qcow2 bench: %s MiB base, clone half overlay / half base, fio %ss, median of %s, %s CPUs, load %s\n' \
  "$SIZE_MIB" "$FIO_SECS" "$REPS" "$(nproc)" "$(cut -d' ' -f1-3 /proc/loadavg)"
printf '| test | stord | qemu-nbd | stord / qemu-nbd | goal |\n|---|---:|---:|---:|---|\n'
row() {  # KEY LABEL GOAL [lower-is-better]
  local s q; s=$(median ${S[stord,$1]}); q=$(median ${S[qemu,$1]})
  if [ "${4:-}" = lower ]; then printf '| %s | %s | %s | %s | %s |\n' "$2" "$s" "$q" "$(ratio "$q" "$s")" "$3"
  else printf '| %s | %s | %s | %s | %s |\n' "$2" "$s" "$q" "$(ratio "$s" "$q")" "$3"; fi
}
row clone "clone of a 20 GiB base (ms; ratio: qemu-img / stord)" "< 50 ms" lower
row seq   "nbdcopy seq read of the clone (MiB/s)" ">= 1.5x"
row rr1   "fio 4k randread QD1 (IOPS)" ">= 1.5x"
row rr32  "fio 4k randread QD32 (IOPS)" ">= 1.5x"
row rw1   "fio 4k randwrite QD1, allocating (IOPS)" ">= 1.5x"
row rw32  "fio 4k randwrite QD32, allocating (IOPS)" ">= 1.5x"
printf '\nchain seq read vs stord raw: %s / %s MiB/s = %s (goal >= 0.8x)\n' \
  "$(median ${S[stord,seq]})" "$(median ${S[raw,seq]})" "$(ratio "$(median ${S[stord,seq]})" "$(median ${S[raw,seq]})")"
for k in "${!S[@]}"; do echo "runs $k: ${S[$k]}"; done | sort
