#!/usr/bin/env bash
# Builds and runs the libFuzzer harness for the Wire decoder.
#   fuzz/wire/build.sh            build only (fuzz/wire/.out/wire-fuzz)
#   fuzz/wire/build.sh run [args] build, seed the corpus, run libFuzzer with [args] (default: 60 s)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="$here/.out"
mkdir -p "$out/corpus"
sources=()
for f in "$root"/Sources/Wire/*.swift "$root"/Sources/Wire/Messages/*.swift; do
    case "$(basename "$f")" in AuthProof.swift|AuthenticatedHandshake.swift) continue;; esac
    sources+=("$f")
done
swiftc -O -g -parse-as-library -sanitize=fuzzer,address -module-name WireFuzz \
    -o "$out/wire-fuzz" "$here/Harness.swift" "$here/Seeds.swift" "${sources[@]}"
if [[ "${1:-}" == run ]]; then
    shift
    FERRY_WIRE_SEEDS_DIR="$out/corpus" "$out/wire-fuzz" -runs=0 >/dev/null 2>&1 || true
    if [[ $# -eq 0 ]]; then set -- -max_total_time=60; fi
    "$out/wire-fuzz" "$out/corpus" -max_len=65536 "$@"
fi
