#!/usr/bin/env bash
# Benchmarks stord against nbdkit (file plugin) and qemu-nbd on the same file, in
# one run: nbdcopy sequential read and write+flush of SIZE (default 1 GiB), fio
# 4 KiB random read / write at QD1 and QD32 (nbd engine). Prints each figure and
# stord's ratio to each reference.
#
# Usage: bench/stord.sh [SIZE_MIB [FIO_SECONDS [REPS]]]   (defaults 1024 4 5)
# TESTS="read rr32" bench/stord.sh runs only those tests (keys below).
# STORD_BASE=/tmp/old/stord bench/stord.sh also measures another stord build, as
# "stord-base", on the same file in the same run (stord / stord-base ratios;
# for the TLS rows also as "stord-base-tls", with the TLS config).
# Needs nbdkit, qemu-nbd, nbdcopy, fio, python3 (python3-libnbd), psktool
# (gnutls-bin); builds stord in release mode.
# Each figure is the median of REPS runs with the three servers taking turns,
# each rep starting with a different one.
#
# TLS rows (keys tread trr1 trr32): stord with tls = "require" against nbdkit
# --tls=require, both on the same file with the same PSK (psktool, gnutls-bin):
# nbdcopy sequential read (tread, measured next to plain stord for the TLS
# cost), and 4 KiB random reads at QD1 / QD32 (trr1, trr32) driven by a small
# python3-libnbd loop: fio's nbd engine cannot read a PSK file (libnbd refuses
# tls-psk-file in a URI unless the program allows local files, and fio does
# not), so these are not fio figures and are not comparable with rr1 / rr32.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE_MIB=${1:-1024}
FIO_SECS=${2:-4}
REPS=${3:-5}
WORK_PREFIX=stord-bench
. bench/stord-common.sh
STORD_BASE=${STORD_BASE:-}
[ -z "$STORD_BASE" ] || [ -x "$STORD_BASE" ] || { echo "$STORD_BASE missing" >&2; exit 1; }


# Writes the config $work/NAME.toml (the lines on stdin, then the bench disk) and
# runs stord on it once, until URI answers: that creates the disk's file.
make_disk() {  # NAME URI
  { cat; printf '[[disk]]\nname = "bench"\nsize = "%sMiB"\nalloc = "fixed"\n' "$SIZE_MIB"; } > "$work/$1.toml"
  "$STORD" serve --config "$work/$1.toml" 2>"$work/$1.log" &
  pids+=($!)
  wait_port "$2"
  kill "${pids[-1]}"; wait "${pids[-1]}" || true
}

# One data file, shared by all three servers (one server at a time).
port=$(free_port)
make_disk stord "nbd://127.0.0.1:$port/bench" <<EOT
listen = "127.0.0.1:$port"
control = "$work/control.sock"
state_dir = "$work/state"
EOT
FILE=$work/state/disks/bench.img
# stord over TLS serves the same file from a second state directory.
psktool -u bench -p "$work/keys.psk" >/dev/null
PSKQ="tls-psk-file=$work/keys.psk"
tport=$(free_port)
make_disk stord-tls "nbds://bench@127.0.0.1:$tport/bench?$PSKQ" <<EOT
listen = "127.0.0.1:$tport"
control = "$work/control-tls.sock"
state_dir = "$work/state-tls"
tls = "require"
tls_psk_file = "$work/keys.psk"
EOT
# Source data for writes, and real data in the disk file for reads.
head -c "$((SIZE_MIB))M" /dev/urandom > "$work/src.bin"
cp "$work/src.bin" "$FILE"
ln -f "$FILE" "$work/state-tls/disks/bench.img"
sync

declare -A R
declare -A URIS

# All three servers run at once on the same file (each on its own port); each
# measurement runs them back to back, so background load on a shared machine
# hits all three alike.
start_server() { # name
  local port; port=$(free_port)
  case $1 in
    stord)
      sed -i "s/^listen = .*/listen = \"127.0.0.1:$port\"/" "$work/stord.toml"
      "$STORD" serve --config "$work/stord.toml" 2>>"$work/stord.log" &
      URIS[$1]="nbd://127.0.0.1:$port/bench";;
    stord-base)
      sed -e "s/^listen = .*/listen = \"127.0.0.1:$port\"/" \
        -e "s|^control = .*|control = \"$work/control-base.sock\"|" "$work/stord.toml" > "$work/stord-base.toml"
      "$STORD_BASE" serve --config "$work/stord-base.toml" 2>>"$work/stord-base.log" &
      URIS[$1]="nbd://127.0.0.1:$port/bench";;
    nbdkit)
      nbdkit -f -i 127.0.0.1 -p "$port" file "$FILE" &
      URIS[$1]="nbd://127.0.0.1:$port/";;
    qemu-nbd)
      qemu-nbd -f raw -b 127.0.0.1 -p "$port" -x bench --persistent --shared=16 \
        --cache=writeback --aio=threads "$FILE" &
      URIS[$1]="nbd://127.0.0.1:$port/bench";;
    stord-tls)
      sed -i "s/^listen = .*/listen = \"127.0.0.1:$port\"/" "$work/stord-tls.toml"
      "$STORD" serve --config "$work/stord-tls.toml" 2>>"$work/stord-tls.log" &
      URIS[$1]="nbds://bench@127.0.0.1:$port/bench?$PSKQ";;
    stord-base-tls)
      sed -e "s/^listen = .*/listen = \"127.0.0.1:$port\"/" \
        -e "s|^control = .*|control = \"$work/control-base-tls.sock\"|" "$work/stord-tls.toml" > "$work/stord-base-tls.toml"
      "$STORD_BASE" serve --config "$work/stord-base-tls.toml" 2>>"$work/stord-base-tls.log" &
      URIS[$1]="nbds://bench@127.0.0.1:$port/bench?$PSKQ";;
    nbdkit-tls)
      nbdkit -f --tls=require --tls-psk="$work/keys.psk" -i 127.0.0.1 -p "$port" file "$FILE" &
      URIS[$1]="nbds://bench@127.0.0.1:$port/?$PSKQ";;
  esac
  pids+=($!)
  wait_port "${URIS[$1]}"
}

fio_run() { # uri rw depth -> IOPS
  fio --name=b --ioengine=nbd --uri="$1" --rw="$2" --bs=4k --iodepth="$3" \
    --size="${SIZE_MIB}m" --time_based --runtime="$FIO_SECS" --ramp_time=1 \
    --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; d=sys.stdin.read(); j=json.loads(d[d.index("{"):])["jobs"][0]; print(int(j["read"]["iops"]+j["write"]["iops"]))'
}

# 4 KiB random reads at queue depth $2 for FIO_SECS through python3-libnbd
# (over TLS: see the header) -> IOPS.
cat > "$work/randread.py" <<'EOT'
import nbd, random, sys, time
uri, depth, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(uri)
blocks = h.get_size() // 4096
rnd = random.Random(1)
bufs = [nbd.Buffer(4096) for _ in range(depth)]
done = [0]
def cb(err):
    done[0] += 1
    return 1
def run(t):
    end = time.monotonic() + t
    i = 0
    while time.monotonic() < end:
        if depth == 1:
            h.pread(4096, rnd.randrange(blocks) * 4096)
            done[0] += 1
            continue
        while h.aio_in_flight() < depth:
            h.aio_pread(bufs[i % depth], rnd.randrange(blocks) * 4096, completion=cb)
            i += 1
        h.poll(-1)
run(1)
done[0] = 0
t0 = time.monotonic()
run(secs)
print(int(done[0] / (time.monotonic() - t0)))
h.shutdown()
EOT
py_randread() { /usr/bin/python3 "$work/randread.py" "$1" "$2" "$FIO_SECS"; }

SERVERS=(stord nbdkit qemu-nbd)
[ -z "$STORD_BASE" ] || SERVERS+=(stord-base)
TLS_SERVERS=(stord-tls nbdkit-tls)
[ -z "$STORD_BASE" ] || TLS_SERVERS+=(stord-base-tls)
for srv in "${SERVERS[@]}" "${TLS_SERVERS[@]}"; do start_server "$srv"; done

median() { python3 -c 'import sys, statistics; print(int(statistics.median(float(x) for x in sys.argv[1:])))' "$@"; }
copy_read() { local t0 t1; t0=$(now); nbdcopy --no-extents "$1" null: ; t1=$(now); python3 -c "print($SIZE_MIB/($t1-$t0))"; }
copy_write() { local t0 t1; t0=$(now); nbdcopy --flush "$work/src.bin" "$1"; t1=$(now); python3 -c "print($SIZE_MIB/($t1-$t0))"; }

# Every figure is the median of REPS runs, the servers taking turns.
# TESTS picks a subset (keys: read write rr1 rr32 rw1 rw32).
TESTS=${TESTS:-read write rr1 rr32 rw1 rw32 tread trr1 trr32}
declare -A S
for key in $TESTS; do
  case $key in
    tread) srvs=("${TLS_SERVERS[@]}" stord);;  # plain stord: the TLS cost
    trr*) srvs=("${TLS_SERVERS[@]}");;
    *) srvs=("${SERVERS[@]}");;
  esac
  for rep in $(seq "$REPS"); do
    # Each rep starts with the next server, so no server always runs first
    # (the first run after a change of test is often the slowest).
    order=("${srvs[@]:rep % ${#srvs[@]}}" "${srvs[@]:0:rep % ${#srvs[@]}}")
    for srv in "${order[@]}"; do
      u=${URIS[$srv]}
      case $key in
        read) v=$(copy_read "$u");;
        write) v=$(copy_write "$u");;
        rr1) v=$(fio_run "$u" randread 1);;
        rr32) v=$(fio_run "$u" randread 32);;
        rw1) v=$(fio_run "$u" randwrite 1);;
        rw32) v=$(fio_run "$u" randwrite 32);;
        tread) v=$(copy_read "$u");;
        trr1) v=$(py_randread "$u" 1);;
        trr32) v=$(py_randread "$u" 32);;
      esac
      S[$srv,$key]="${S[$srv,$key]:-} $v"
    done
  done
  for srv in "${srvs[@]}"; do
    # shellcheck disable=SC2086
    R[$srv,$key]=$(median ${S[$srv,$key]})
  done
done

printf '\nstord bench: %s MiB file, fio %ss per point, median of %s, %s CPUs (%s), load %s\n' "$SIZE_MIB" "$FIO_SECS" "$REPS" "$(nproc)" "$(uname -r)" "$(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-28s %10s %10s %10s %10s %10s  %s\n' "test" "stord" "nbdkit" "qemu-nbd" "/nbdkit" "/qemu-nbd" "goal vs nbdkit"
row() { # key label unit goal
  [ -n "${R[stord,$1]:-}" ] || return 0
  printf '%-28s %10s %10s %10s %10s %10s  %s\n' "$2 ($3)" "${R[stord,$1]}" "${R[nbdkit,$1]}" "${R[qemu-nbd,$1]}" \
    "$(ratio "${R[stord,$1]}" "${R[nbdkit,$1]}")" "$(ratio "${R[stord,$1]}" "${R[qemu-nbd,$1]}")" "$4"
}
row read  "nbdcopy seq read"        "MiB/s" ">= 1.1x"
row write "nbdcopy write+flush"     "MiB/s" ">= 1.2x"
row rr1   "fio 4k randread QD1"     "IOPS"  ">= 1.0x"
row rr32  "fio 4k randread QD32"    "IOPS"  ">= 1.2x"
row rw1   "fio 4k randwrite QD1"    "IOPS"  ">= 1.0x"
row rw32  "fio 4k randwrite QD32"   "IOPS"  ">= 1.2x"

tls_row() { # key label unit
  [ -n "${R[stord-tls,$1]:-}" ] || return 0
  printf '%-28s %10s %10s %10s  %s\n' "$2 ($3)" "${R[stord-tls,$1]}" "${R[nbdkit-tls,$1]}" \
    "$(ratio "${R[stord-tls,$1]}" "${R[nbdkit-tls,$1]}")" ">= 1.0x"
}
if [ -n "${R[stord-tls,tread]:-}${R[stord-tls,trr1]:-}${R[stord-tls,trr32]:-}" ]; then
  printf '\nTLS (PSK, tls=require on both)\n'
  printf '%-28s %10s %10s %10s  %s\n' "test" "stord-tls" "nbdkit-tls" "/nbdkit" "goal vs nbdkit TLS"
  tls_row tread "nbdcopy seq read TLS" "MiB/s"
  tls_row trr1  "py 4k randread QD1 TLS" "IOPS"
  tls_row trr32 "py 4k randread QD32 TLS" "IOPS"
  if [ -n "${R[stord,tread]:-}" ]; then
    printf '%-28s %10s  (plain stord, same reps: %s MiB/s; goal < 30%%)\n' "TLS cost on seq read" \
      "$(python3 -c "print(f'{100*(1-${R[stord-tls,tread]}/${R[stord,tread]}):.0f}%')")" "${R[stord,tread]}"
  fi
fi

# Every run, in the order run, for judging the spread behind each median.
printf '\nall runs:\n'
for key in $TESTS; do
  for srv in "${SERVERS[@]}" "${TLS_SERVERS[@]}"; do
    [ -n "${S[$srv,$key]:-}" ] || continue
    # shellcheck disable=SC2086
    printf '%-5s %-10s %s\n' "$key" "$srv" "$(printf '%.0f ' ${S[$srv,$key]})"
  done
done

if [ -n "$STORD_BASE" ]; then
  printf '\nstord-base (%s), same run:\n' "$STORD_BASE"
  printf '%-28s %10s %10s %10s\n' "test" "stord" "stord-base" "/base"
  for key in $TESTS; do
    [ -n "${R[stord-base,$key]:-}" ] || continue
    printf '%-28s %10s %10s %10s\n' "$key" "${R[stord,$key]}" "${R[stord-base,$key]}" "$(ratio "${R[stord,$key]}" "${R[stord-base,$key]}")"
  done
  for key in $TESTS; do
    [ -n "${R[stord-base-tls,$key]:-}" ] || continue
    printf '%-28s %10s %10s %10s\n' "$key (TLS)" "${R[stord-tls,$key]}" "${R[stord-base-tls,$key]}" "$(ratio "${R[stord-tls,$key]}" "${R[stord-base-tls,$key]}")"
  done
fi
