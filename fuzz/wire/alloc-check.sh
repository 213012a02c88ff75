#!/usr/bin/env bash
# Proves the Wire hot path (page batch / disk extents / ack encode + decode) allocates nothing per
# frame: runs AllocCheck.swift under valgrind with 1,000 and 11,000 iterations and compares the
# heap allocation counts. Needs valgrind (Debian package valgrind).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="$here/.out"
mkdir -p "$out"
sources=()
for f in "$root"/Sources/Wire/*.swift "$root"/Sources/Wire/Messages/*.swift; do
    case "$(basename "$f")" in AuthProof.swift|AuthenticatedHandshake.swift) continue;; esac
    sources+=("$f")
done
swiftc -O -module-name WireAllocCheck -o "$out/alloc-check" "$here/AllocCheck.swift" "${sources[@]}"
"$out/alloc-check"
a=$(valgrind "$out/alloc-check" 1000 2>&1 | sed -n 's/.*total heap usage: \([0-9,]*\) allocs.*/\1/p')
b=$(valgrind "$out/alloc-check" 11000 2>&1 | sed -n 's/.*total heap usage: \([0-9,]*\) allocs.*/\1/p')
echo "heap allocations: $a with 1,000 iterations, $b with 11,000"
if [[ -z "$a" || "$a" != "$b" ]]; then echo "FAIL: the hot path allocates per frame"; exit 1; fi
echo "OK: no allocation per frame"
