#!/usr/bin/env bash
# Runs every test of the fabric: installs what the tests need (as root, from Debian),
# prepares the guest assets, builds once in release mode and runs unit and end-to-end
# tests.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  pkgs=$(cat .ci/packages/*.txt | sed 's/#.*//' | tr -s ' \n' ' ')
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
fi

scripts/guest-assets.sh

cargo build --release --workspace --bins
cargo test --release --workspace
