#!/usr/bin/env bash
# Installs every Debian package Ferry's build, tests, demo and benchmarks need. Idempotent.
set -euo pipefail
packages=(
  pkg-config liburing-dev libnbd-dev libxxhash-dev   # build: io_uring and libnbd through pkg-config
  libssl-dev                                       # build: ferry-bench seal measures OpenSSL 3 beside the link's BoringSSL
  libzstd-dev                                      # build: zstd compresses bulk payloads on slow links
  libnbd-bin python3-libnbd nbdkit qemu-utils fio nbd-server   # real NBD peers and clients
  iperf3 iproute2 coreutils procps                 # link benchmarks, network namespaces
  valgrind                                         # scripts/fuzz.sh: the Wire hot path's allocation check
  qemu-system-x86 busybox-static gcc cpio xz-utils # scripts/guest/build.sh: the test guest (QEMU, its initramfs, vmlinux)
  ansible-core ansible-lint openssh-server python3-apt   # deploy/: playbooks, lint, the deploy test's per-host sshd, the apt task
  python3-matplotlib                               # scripts/drill/run.py: the drills' plots (/usr/bin/python3)
)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v swift >/dev/null || { [ -x /opt/swift/usr/bin/swift ] && export PATH=/opt/swift/usr/bin:$PATH; }
command -v swift >/dev/null || { echo "setup: swift 6.1 or later is needed on PATH" >&2; exit 1; }
echo "setup: ready ($(swift --version 2>/dev/null | head -1))"
