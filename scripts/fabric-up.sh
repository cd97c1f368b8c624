#!/usr/bin/env bash
# Brings the fabric up from configs/: stord (configs/stord.toml) and netd
# (configs/netd.toml), in the foreground, until Ctrl-C or SIGTERM. Needs root (netd
# creates TAP devices). Builds the release binaries first.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins -p stord -p netd
pids=()
stop() { kill -TERM "${pids[@]}" 2>/dev/null || true; wait; }
trap stop INT TERM
target/release/stord serve --config "${STORD_CONFIG:-configs/stord.toml}" &
pids+=($!)
target/release/netd serve --config "${NETD_CONFIG:-configs/netd.toml}" &
pids+=($!)
wait -n
stop
