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
set -euo pipefail
cd "$(dirname "$0")/.."

ASSETS=${FABRIC_ASSETS:-$PWD/target/guest-assets}
if [ -f "$ASSETS/READY" ]; then
  echo "guest assets ready in $ASSETS ($(cat "$ASSETS/READY"))"
  exit 0
fi

rm -rf "$ASSETS.tmp"
mkdir -p "$ASSETS.tmp/debs" "$ASSETS.tmp/root" "$ASSETS.tmp/bin" "$ASSETS.tmp/modules"
cd "$ASSETS.tmp/debs"

kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$kpkg" ]; then
  echo "guest-assets: cannot resolve linux-image-amd64 (run apt-get update first)" >&2
  exit 1
fi
apt-get download -q qemu-system-x86 qemu-system-common qemu-system-data seabios \
  ipxe-qemu "$kpkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true
for deb in *.deb; do
  dpkg-deb -x "$deb" ../root
done
cd ..

# The QEMU wrapper: firmware search paths and the accelerator module directory.
root="$ASSETS/root"
cat > bin/qemu-system-x86_64 <<EOF
#!/bin/sh
export QEMU_MODULE_DIR="$root/usr/lib/x86_64-linux-gnu/qemu"
exec "$root/usr/bin/qemu-system-x86_64" -L "$root/usr/share/qemu" \\
  -L "$root/usr/share/seabios" -L "$root/usr/lib/ipxe/qemu" "\$@"
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
# The wrapper names the final directory; it was written with it already.
echo "guest assets ready in $ASSETS ($kver)"
