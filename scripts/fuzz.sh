#!/usr/bin/env bash
# Builds every cargo-fuzz target under fuzz/ and runs each for a short time on stable Rust
# (no sanitizer, so no nightly flags are needed). Exits non-zero if any target crashes,
# panics, times out or fails to build; the input that did it is saved under
# fuzz/artifacts/<target>/ and `cargo fuzz run <target> <that file>` replays it.
#
#   scripts/fuzz.sh                       # every target, 20 s each
#   FUZZ_SECONDS=300 scripts/fuzz.sh request secret_name
#
# Environment:
#   FUZZ_SECONDS    seconds per target (default 20)
#   FUZZ_SANITIZER  none (default; stable Rust) or address/leak/memory/thread (nightly Rust)
#   FUZZ_WORK       where the growing corpora live (default fuzz/target/corpus); the committed
#                   seeds in fuzz/corpus/<target>/ are read, never written
#   FUZZ_ARGS       extra libFuzzer flags, e.g. "-max_len=8192"
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-20}"
sanitizer="${FUZZ_SANITIZER:-none}"
work="${FUZZ_WORK:-fuzz/target/corpus}"
cargo_fuzz_version="0.13.2"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz $cargo_fuzz_version"
    cargo install --locked cargo-fuzz --version "$cargo_fuzz_version"
fi

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

echo "== cargo fuzz build (sanitizer: $sanitizer)"
cargo fuzz build --sanitizer "$sanitizer"

logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT
failed=()
summary=()
for t in "${targets[@]}"; do
    echo "== cargo fuzz run $t (${seconds}s)"
    mkdir -p "$work/$t" "fuzz/artifacts/$t"
    status=0
    # New inputs go to the first corpus directory (the work corpus); seeds are read only.
    # -timeout: one input taking longer than 10 s counts as a failure (a hang).
    # shellcheck disable=SC2086
    cargo fuzz run --sanitizer "$sanitizer" "$t" "$work/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 ${FUZZ_ARGS:-} \
        >"$logs/$t.log" 2>&1 || status=$?
    done_line="$(grep -E '^#[0-9]+[[:space:]]+DONE' "$logs/$t.log" | tail -n 1 || true)"
    runs="$(grep -E '^stat::number_of_executed_units:' "$logs/$t.log" | awk '{print $2}' || true)"
    per_sec="$(grep -E '^stat::average_exec_per_sec:' "$logs/$t.log" | awk '{print $2}' || true)"
    cov="$(sed -nE 's/.* cov: ([0-9]+) ft: ([0-9]+) corp: ([^ ]+).*/cov \1, features \2, corpus \3/p' <<<"$done_line")"
    if [ "$status" -ne 0 ]; then
        failed+=("$t")
        echo "!! $t failed (exit $status):"
        grep -E 'panicked|ERROR: libFuzzer|SUMMARY|Test unit written|Base64:|^Failing input' "$logs/$t.log" || tail -n 40 "$logs/$t.log"
        summary+=("$t: FAILED (exit $status), ${runs:-?} runs")
    else
        summary+=("$t: ok, ${runs:-?} runs, ${per_sec:-?} exec/s, ${cov:-no stats}")
    fi
done

echo "== summary (${seconds}s per target)"
printf '  %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "crashing targets: ${failed[*]}; inputs under fuzz/artifacts/<target>/" >&2
    exit 1
fi
