#!/usr/bin/env bash
# Runs strongroom's benchmark (benches/load/: real strongroomd children over mutual TLS on
# loopback, fresh SoftHSM2 tokens, every figure a ratio against a baseline measured in the
# same run) and prints its results table. A full run takes 6–8 minutes; --quick about one.
#
#   scripts/bench.sh                         # parts audit,floor,hsm,put,big
#   scripts/bench.sh --quick                 # the same in about a minute
#   scripts/bench.sh --parts all             # also diag (log line, audit checkpoints) and frontdoor
#   scripts/bench.sh --parts frontdoor       # idle connections + junk-name flood (about 90 s)
#   scripts/bench.sh --parts custom --concurrency 64 --read-pct 90 --secs 10
#   scripts/bench.sh --help                  # every option
#
# The table is also written to target/bench/results-<time>.md. The machine should be idle:
# the load generator and the server share its cores.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -e "${STRONGROOM_BENCH_PKCS11_MODULE:-/usr/lib/softhsm/libsofthsm2.so}" ]; then
    echo "SoftHSM2 is missing: run scripts/deps.sh" >&2
    exit 1
fi
for a in "$@"; do
    if [ "$a" = "--help" ] || [ "$a" = "-h" ]; then
        exec cargo bench --bench load -- --help
    fi
done

out="target/bench/results-$(date +%Y%m%d-%H%M%S).md"
echo "load before the run: $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15 min), $(nproc) cores" >&2
# Progress goes to stderr; the table is read back from the file.
status=0
cargo bench --bench load -- --out "$out" "$@" >/dev/null || status=$?
if [ -s "$out" ]; then
    echo
    cat "$out"
    echo
    echo "(written to $out)"
fi
exit "$status"
