#!/usr/bin/env bash
# Builds Ferry's test guest: a Debian kernel and an initramfs running guest/ferry-guest.c.
#   bash scripts/guest/build.sh [OUTDIR]     (default ${FERRY_GUEST_DIR:-<repo>/.build-guest})
# Prints OUTDIR/vmlinuz and OUTDIR/initrd.gz, one a line, on stdout (progress goes to stderr).
# Also writes OUTDIR/vmlinux, the same kernel decompressed (an ELF with a PVH entry): QEMU boots it
# with `-kernel OUTDIR/vmlinux` about 5 s sooner under TCG (no in-guest xz decompression).
# Needs (Debian 12): qemu-system-x86 busybox-static gcc cpio (scripts/setup.sh installs them).
# The kernel is never installed on the host: the package that linux-image-amd64 depends on is
# fetched with `apt-get download` into OUTDIR/debs and unpacked with `dpkg-deb -x` into a
# temporary directory. Busybox is /bin/busybox of busybox-static, or downloaded the same way.
# Cached: rebuilds only when guest/*, this script, the kernel package or busybox changed
# (OUTDIR/stamp holds the hash of those inputs). Concurrent runs serialise on OUTDIR/lock.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${1:-${FERRY_GUEST_DIR:-$repo/.build-guest}}
mkdir -p "$out/debs"
out=$(cd "$out" && pwd)
log() { echo "guest-build: $*" >&2; }

exec 9>"$out/lock"
flock 9

# The kernel package: what linux-image-amd64 depends on (e.g. linux-image-6.1.0-57-amd64 (= 6.1.192-3)),
# as `apt-cache depends linux-image-amd64` shows; read from one `apt-cache show` (each apt-cache
# call can take a second where apt keeps no pkgcache.bin).
read -r kpkg kver < <(apt-cache show --no-all-versions linux-image-amd64 2>/dev/null |
  awk '$1 == "Depends:" { for (i = 2; i <= NF; i++) if ($i ~ /^linux-image-[0-9]/) {
         v = $(i + 2); gsub(/[),]/, "", v); print $i, ($(i + 1) == "(=" ? v : ""); exit } }') || true
kdeb=""
if [ -n "${kpkg:-}" ]; then
  [ -n "${kver:-}" ] || kver=$(apt-cache show --no-all-versions "$kpkg" | awk '$1 == "Version:" { print $2; exit }')
  # apt-get download names the file PACKAGE_VERSION_ARCH.deb with ':' of an epoch as %3a.
  kdeb=$(ls "$out/debs/${kpkg}_${kver//:/%3a}_"*.deb 2>/dev/null | head -n 1) || true
  if [ -z "$kdeb" ]; then
    log "downloading $kpkg $kver"
    (cd "$out/debs" && apt-get download -q -o APT::Sandbox::User=root "$kpkg" >&2)
    kdeb=$(ls "$out/debs/${kpkg}_${kver//:/%3a}_"*.deb | head -n 1)
    for old in "$out/debs"/linux-image-*.deb; do [ "$old" = "$kdeb" ] || rm -f "$old"; done
  fi
else
  # No apt metadata (offline): fall back on a kernel package downloaded before.
  kdeb=$(ls -t "$out/debs"/linux-image-[0-9]*.deb 2>/dev/null | head -n 1) || true
  [ -n "$kdeb" ] || { log "cannot resolve linux-image-amd64 (apt-cache depends) and no cached kernel package"; exit 1; }
  kpkg=$(dpkg-deb -f "$kdeb" Package)
  kver=$(dpkg-deb -f "$kdeb" Version)
  log "apt metadata unavailable: using cached $kpkg $kver"
fi

# Busybox: a static one (busybox-static's /bin/busybox; the plain busybox package is dynamic).
if dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "install ok installed"; then
  busybox=/bin/busybox
else
  busybox=$out/debs/busybox-static/bin/busybox
  if [ ! -x "$busybox" ]; then
    log "busybox-static is not installed: downloading it"
    rm -f "$out/debs"/busybox-static_*.deb
    (cd "$out/debs" && apt-get download -q -o APT::Sandbox::User=root busybox-static >&2)
    rm -rf "$out/debs/busybox-static"
    dpkg-deb -x "$out/debs"/busybox-static_*.deb "$out/debs/busybox-static"
  fi
fi

inputs=$(
  cd "$repo"
  for f in guest/* scripts/guest/build.sh; do [ -f "$f" ] && { echo "$f"; sha256sum <"$f"; }; done
  echo "kernel $kpkg $kver ${kdeb##*/} $(stat -c %s "$kdeb")"
  echo "busybox $(sha256sum <"$busybox")"
  echo "gcc $(gcc -dumpfullversion 2>/dev/null || gcc -dumpversion)"
)
stamp=$(sha256sum <<<"$inputs" | cut -d' ' -f1)
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] && [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.gz" ]; then
  log "up to date ($kpkg $kver)"
  echo "$out/vmlinuz"
  echo "$out/initrd.gz"
  exit 0
fi

log "building with $kpkg $kver"
tmp=$(mktemp -d "$out/tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
dpkg-deb -x "$kdeb" "$tmp/kernel"
vmlinuz=$(ls "$tmp/kernel/boot"/vmlinuz-* | head -n 1)
release=${vmlinuz##*/vmlinuz-}
kmods=$tmp/kernel/lib/modules/$release/kernel

root=$tmp/root
mkdir -p "$root"/{bin,dev,proc,sys,tmp,root} "$root/lib/modules/$release/kernel"
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done
install -m 0755 "$repo/guest/init" "$root/init"
gcc -static -O2 -Wall -Wextra -Werror -pthread -s -o "$root/bin/ferry-guest" "$repo/guest/ferry-guest.c"

# The virtio modules (guest/init loads them in dependency order), uncompressed: busybox insmod
# may not read .ko.xz.
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk \
    failover net_failover virtio_net; do
  ko=$(find "$kmods" \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" \) | head -n 1)
  [ -n "$ko" ] || { log "module $m not found in $kpkg"; exit 1; }
  rel=${ko#"$kmods"/}
  dest=$root/lib/modules/$release/kernel/${rel%.xz}
  dest=${dest%.zst}; dest=${dest%.gz}
  mkdir -p "$(dirname "$dest")"
  case "$ko" in
    *.xz) xz -dc "$ko" >"$dest" ;;
    *.zst) zstd -qdc "$ko" >"$dest" ;;
    *.gz) gzip -dc "$ko" >"$dest" ;;
    *) cp "$ko" "$dest" ;;
  esac
done

if command -v cpio >/dev/null; then cpio=(cpio --quiet -o -H newc -R 0:0); else cpio=("$busybox" cpio -o -H newc -R 0:0); fi
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | "${cpio[@]}") | gzip -9n >"$tmp/initrd.gz"
cp "$vmlinuz" "$tmp/vmlinuz"
# Also the kernel decompressed, OUTDIR/vmlinux: an ELF that QEMU boots through its PVH entry
# (-kernel vmlinux), which under TCG saves the ~5 s the guest spends decompressing vmlinuz.
xzat=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$vmlinuz" | head -n 1 | cut -d: -f1) || true
if [ -n "$xzat" ] && xz -dc --single-stream <(tail -c +"$((xzat + 1))" "$vmlinuz") >"$tmp/vmlinux" 2>/dev/null &&
  [ "$(head -c 4 "$tmp/vmlinux" | od -An -tx1 | tr -d ' ')" = 7f454c46 ]; then
  mv -f "$tmp/vmlinux" "$out/vmlinux"
else
  log "no xz payload in $(basename "$vmlinuz"): no vmlinux (boot vmlinuz)"
  rm -f "$out/vmlinux"
fi
mv -f "$tmp/vmlinuz" "$out/vmlinuz"
mv -f "$tmp/initrd.gz" "$out/initrd.gz"
echo "$stamp" >"$out/stamp"
printf '%s\n' "$inputs" >"$out/stamp.inputs"
log "built $out/vmlinuz ($release) and $out/initrd.gz ($(du -k "$out/initrd.gz" | cut -f1) KiB)"
echo "$out/vmlinuz"
echo "$out/initrd.gz"
