#!/usr/bin/env bash
# Runs the Wire decoder's fuzz harnesses for a bounded time (scripts/test.sh runs it after the tests,
# so CI does):
#   1. libFuzzer (fuzz/wire/build.sh): the seed corpus, then FUZZ_RUNS more inputs (default 500,000:
#      about ten seconds), every frame that decodes re-encoded and compared; any crash fails.
#   2. the allocation check (fuzz/wire/alloc-check.sh): the encode/decode hot path under valgrind
#      makes the same number of heap allocations for 1,000 and 11,000 frames.
# Needs the toolchain's libFuzzer runtime (libclang_rt.fuzzer, shipped with swift.org toolchains for
# Linux) and valgrind (scripts/setup.sh installs it). Either missing: a printed reason and a skip, or
# a failure under FERRY_REQUIRE_ALL=1 (CI).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${FUZZ_RUNS:-500000}
out=fuzz/wire/.out
mkdir -p "$out"
failed=0

unavailable() { # what is missing
  if [ "${FERRY_REQUIRE_ALL:-0}" = 1 ]; then
    echo "fuzz: FAIL: $1 (FERRY_REQUIRE_ALL=1 forbids skipping)" >&2
    failed=1
  else
    echo "fuzz: SKIP: $1" >&2
  fi
}

swiftc=$(command -v swiftc || true)
[ -n "$swiftc" ] || { echo "fuzz: FAIL: swiftc is not on PATH" >&2; exit 1; }
toolchain=$(dirname "$(dirname "$(readlink -f "$swiftc")")")
runtime=$(compgen -G "$toolchain/lib/clang/*/lib/linux/libclang_rt.fuzzer-$(uname -m).a" | head -1 || true)

# 1. libFuzzer.
if [ -z "$runtime" ]; then
  unavailable "libFuzzer is not available with this Swift toolchain ($("$swiftc" --version 2>&1 | head -1)): no libclang_rt.fuzzer-$(uname -m).a under $toolchain/lib/clang/*/lib/linux"
else
  echo "fuzz: building the libFuzzer harness (fuzz/wire/build.sh, runtime $runtime)"
  if ! bash fuzz/wire/build.sh > "$out/build.log" 2>&1; then
    grep -v "ld.gold: warning" "$out/build.log" | tail -20 >&2
    echo "fuzz: FAIL: the libFuzzer harness did not build (log: $out/build.log)" >&2
    failed=1
  else
    rm -rf "$out/corpus" && mkdir -p "$out/corpus"
    FERRY_WIRE_SEEDS_DIR="$out/corpus" "$out/wire-fuzz" -runs=0 > /dev/null 2>&1 || true
    seeds=$(find "$out/corpus" -type f | wc -l)
    echo "fuzz: libFuzzer, $seeds seeds, $runs runs (at most 300 s)"
    start=$(date +%s)
    if "$out/wire-fuzz" "$out/corpus" -max_len=65536 -runs="$runs" -max_total_time=300 -print_final_stats=1 \
         -artifact_prefix="$out/" > "$out/fuzz.log" 2>&1; then
      done_line=$(grep -E "^Done [0-9]+ runs" "$out/fuzz.log" | tail -1)
      echo "fuzz: libFuzzer OK: ${done_line:-no Done line} ($(( $(date +%s) - start )) s, corpus $(find "$out/corpus" -type f | wc -l) inputs)"
      [ "$seeds" -gt 0 ] || { echo "fuzz: FAIL: the seed corpus is empty (Seeds.swift wrote nothing)" >&2; failed=1; }
    else
      tail -40 "$out/fuzz.log" >&2
      echo "fuzz: FAIL: libFuzzer found a crash; reproduce with $out/wire-fuzz $(ls "$out"/crash-* "$out"/leak-* "$out"/timeout-* 2>/dev/null | head -1)" >&2
      failed=1
    fi
  fi
fi

# 2. Allocation check under valgrind.
if ! command -v valgrind > /dev/null; then
  unavailable "valgrind is not installed (Debian package valgrind; scripts/setup.sh installs it)"
else
  echo "fuzz: allocation check (fuzz/wire/alloc-check.sh, valgrind)"
  if bash fuzz/wire/alloc-check.sh > "$out/alloc-check.log" 2>&1; then
    grep -E "^(heap allocations|OK)" "$out/alloc-check.log" | sed 's/^/fuzz: /'
  else
    grep -v "ld.gold: warning" "$out/alloc-check.log" | tail -20 >&2
    echo "fuzz: FAIL: the allocation check failed (log: $out/alloc-check.log)" >&2
    failed=1
  fi
fi

exit $failed
