#!/usr/bin/env bash
# Runs the cargo-fuzz (libFuzzer) targets in fuzz/ for a bounded time each. Not part of CI.
#
#   FUZZ_SECONDS=60 bash scripts/fuzz.sh            # every target, 60 s each (the default)
#   FUZZ_SECONDS=600 bash scripts/fuzz.sh glob      # one target
#
# Corpora are kept (and grow) in fuzz/corpus/<target>; crashing inputs land in
# fuzz/artifacts/<target>/ and each run's log in fuzz/artifacts/logs/<target>.log. Replay a
# crash with `cargo fuzz run --sanitizer none <target> fuzz/artifacts/<target>/crash-…`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
seconds=${FUZZ_SECONDS:-60}
# Two shared cores: build one crate at a time unless told otherwise.
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1}

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

# Only the stable toolchain is available. `--sanitizer none` keeps cargo-fuzz from passing
# `-Zsanitizer=address`, the one nightly-only flag it adds by default; the coverage
# instrumentation it uses (`-Cpasses=sancov-module`, `-Cllvm-args=-sanitizer-coverage-*`) is
# stable, so no RUSTC_BOOTSTRAP is needed. runcache forbids `unsafe`, so AddressSanitizer
# would add little: the targets look for panics and broken properties.
fuzz=(cargo fuzz run --sanitizer none --target-dir "$root/fuzz/target")

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

mkdir -p "$root/fuzz/artifacts/logs"
failed=()
for target in "${targets[@]}"; do
    mkdir -p "$root/fuzz/corpus/$target" "$root/fuzz/artifacts/$target"
    log=$root/fuzz/artifacts/logs/$target.log
    echo "== $target: ${seconds}s (log: ${log#"$root"/})"
    set +e
    "${fuzz[@]}" "$target" "$root/fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -print_final_stats=1 2>&1 | tee "$log" |
        grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)|^Done |^stat::number_of_executed_units|panicked at|^SUMMARY|^Error'
    status=("${PIPESTATUS[@]}")
    set -e
    if [ "${status[0]}" -ne 0 ]; then
        failed+=("$target")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzzing found failures in: ${failed[*]} (inputs under fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzzing: ${#targets[@]} target(s), ${seconds}s each, nothing found"
