#!/usr/bin/env bash
# Prepares what the guest tests boot, all from Debian's packages, into $FABRIC_ASSETS
# (default: <workspace>/target/guest-assets):
#
#   bin/qemu-system-x86_64   QEMU (TCG; Debian's qemu-system-x86, unpacked, not
#                            installed: installing it would remove the qemu-utils
#                            backport this machine ships), run through a wrapper that
#                            points it at its firmware and module directories
#   vmlinuz                  the Debian kernel (bzImage, for -M pc and for bzImage loaders)
#   vmlinux                  the same kernel as an uncompressed ELF (for -M microvm)
#   modules/*.ko, modules/load-order   the virtio modules, in the order to insmod them
#   busybox                  static busybox (Debian busybox-static)
#   READY                    written last; names the kernel version
#
# Idempotent: it does nothing when READY is present. Needs apt lists (apt-get update).
# Exits 3 when Debian's archive does not answer (the packages could not be fetched),
# 1 on any other failure.
#
# A finished set is also kept in $FABRIC_ASSETS_CACHE (default
# /var/cache/fabric/guest-assets, when writable): a later checkout on the same machine
# copies it from there instead of downloading the packages again, and a machine whose
# archive does not answer can still run the guest tests if it has that copy.
set -euo pipefail
cd "$(dirname "$0")/.."

ASSETS=${FABRIC_ASSETS:-$PWD/target/guest-assets}
CACHE=${FABRIC_ASSETS_CACHE:-/var/cache/fabric/guest-assets}
if [ -f "$ASSETS/READY" ]; then
  echo "guest assets ready in $ASSETS ($(cat "$ASSETS/READY"))"
  exit 0
fi
if [ -f "$CACHE/READY" ] && [ "$(readlink -f "$CACHE")" != "$(readlink -f "$ASSETS")" ]; then
  rm -rf "$ASSETS.tmp"
  mkdir -p "$(dirname "$ASSETS")"
  cp -a "$CACHE" "$ASSETS.tmp"
  rm -rf "$ASSETS"
  mv "$ASSETS.tmp" "$ASSETS"
  echo "guest assets ready in $ASSETS ($(cat "$ASSETS/READY"), copied from $CACHE)"
  exit 0
fi

rm -rf "$ASSETS.tmp"
mkdir -p "$ASSETS.tmp/debs" "$ASSETS.tmp/root" "$ASSETS.tmp/bin" "$ASSETS.tmp/modules"
cd "$ASSETS.tmp/debs"

kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$kpkg" ]; then
  echo "guest-assets: cannot resolve linux-image-amd64 (no apt lists: apt-get update did not reach the archive)" >&2
  exit 3
fi
# The packages come from the network, which may not answer at once on a machine that
# just booted (a resolver not yet up): each missing package is retried with a growing
# pause, and a package already in apt's own cache is taken from there.
pkgs="qemu-system-x86 qemu-system-common qemu-system-data seabios ipxe-qemu $kpkg"
have() { ls "$1"_*.deb >/dev/null 2>&1; }
for p in $pkgs; do
  cached=$(ls /var/cache/apt/archives/"$p"_*.deb 2>/dev/null | head -n1 || true)
  [ -n "$cached" ] && cp "$cached" .
done
for attempt in 1 2 3 4 5 6; do
  missing=""
  for p in $pkgs; do have "$p" || missing="$missing $p"; done
  [ -z "$missing" ] && break
  if [ "$attempt" -gt 1 ]; then
    echo "guest-assets: download of$missing failed (try $((attempt - 1)) of 6); retrying in $((attempt * 10)) s" >&2
    sleep $((attempt * 10))
    apt-get update -qq 2>&1 | grep -v '^W: Download is performed unsandboxed' || true
  fi
  # shellcheck disable=SC2086
  apt-get download -q $missing 2>&1 | grep -v '^W: Download is performed unsandboxed' || true
done
for p in $pkgs; do
  if ! have "$p"; then
    echo "guest-assets: cannot download the Debian package $p (no answer from the archive after 6 tries)" >&2
    exit 3
  fi
done
for deb in *.deb; do
  dpkg-deb -x "$deb" ../root
done
cd ..

# The QEMU wrapper: firmware search paths and the accelerator module directory, found
# from the wrapper's own place so that the set can be copied elsewhere.
cat > bin/qemu-system-x86_64 <<'EOF'
#!/bin/sh
root=$(dirname "$(readlink -f "$0")")/../root
export QEMU_MODULE_DIR="$root/usr/lib/x86_64-linux-gnu/qemu"
exec "$root/usr/bin/qemu-system-x86_64" -L "$root/usr/share/qemu" \
  -L "$root/usr/share/seabios" -L "$root/usr/lib/ipxe/qemu" "$@"
EOF
chmod +x bin/qemu-system-x86_64

# The kernel, compressed and as an ELF: the bzImage payload is XZ.
vmlinuz=$(ls root/boot/vmlinuz-* | head -n1)
kver=${vmlinuz##*/vmlinuz-}
cp "$vmlinuz" vmlinuz
python3 - vmlinuz vmlinux <<'EOF'
import lzma, sys
data = open(sys.argv[1], "rb").read()
start = data.find(b"\xfd7zXZ\x00")
if start < 0:
    sys.exit("no XZ payload in the bzImage")
d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
elf = d.decompress(data[start:])
if elf[:4] != b"\x7fELF":
    sys.exit("the XZ payload is not an ELF image")
open(sys.argv[2], "wb").write(elf)
EOF

# The virtio modules, plain .ko, in load order (each after what it depends on).
order="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci \
virtio_mmio failover net_failover virtio_net virtio_blk"
: > modules/load-order
for m in $order; do
  f=$(find "root/lib/modules/$kver" -name "$m.ko*" | head -n1)
  [ -n "$f" ] || continue
  case "$f" in
    *.ko.xz) xz -dc "$f" > "modules/$m.ko" ;;
    *.ko.zst) zstd -qdc "$f" > "modules/$m.ko" ;;
    *.ko.gz) gzip -dc "$f" > "modules/$m.ko" ;;
    *) cp "$f" "modules/$m.ko" ;;
  esac
  echo "$m.ko" >> modules/load-order
done

cp "$(command -v busybox || echo /bin/busybox)" busybox
# The modules tree is large and no longer needed; the debs neither.
rm -rf debs "root/lib/modules" "root/usr/lib/modules"

echo "$kver" > READY
cd ..
rm -rf "$ASSETS"
mv "$ASSETS.tmp" "$ASSETS"
echo "guest assets ready in $ASSETS ($kver)"
# Keep a copy for later checkouts on this machine (best effort: a read-only or full
# cache directory only costs the next run a download).
if [ "$(readlink -f "$CACHE")" != "$(readlink -f "$ASSETS")" ] &&
  mkdir -p "$(dirname "$CACHE")" 2>/dev/null; then
  rm -rf "$CACHE.tmp"
  if cp -a "$ASSETS" "$CACHE.tmp" 2>/dev/null; then
    rm -rf "$CACHE"
    mv "$CACHE.tmp" "$CACHE"
  else
    rm -rf "$CACHE.tmp"
  fi
fi
