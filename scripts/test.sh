#!/usr/bin/env bash
# The whole test suite: format, lints, docs, then every test against real SoftHSM2 tokens,
# real mutual TLS on loopback and real sled stores; the integration suite again on the etcd
# backend (each test starts its own etcd); and the integration suite a third time on
# Kryoptic, a second, independent PKCS#11 implementation (built once and cached by
# scripts/kryoptic.sh). cargo-nextest runs each test in its own process (PKCS#11 allows one
# C_Initialize per process, and each test has its own token).
#
# The Kryoptic pass runs the whole integration suite (tests/it) on the sled store: the store
# backend and the token are independent layers, and etcd is covered on SoftHSM2, so token x
# store is covered by two passes out of four rather than all four (about 5 minutes saved).
# Tests that depend on one token's files or quirks skip on the other with a printed reason.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh

# A header per pass, and how long it took.
pass() {
    echo
    echo "================================================================================"
    echo "== $*"
    echo "================================================================================"
    SECONDS=0
}
took() { echo "== ($1 took ${SECONDS} s)"; }

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo doc"
RUSTDOCFLAGS=-Dwarnings cargo doc --no-deps --locked --quiet
echo "== fuzz (short run; FUZZ_SECONDS per target)"
FUZZ_SECONDS="${FUZZ_SECONDS:-15}" scripts/fuzz.sh

pass "tests: every crate; integration suite on token SoftHSM2, store sled"
STRONGROOM_TEST_TOKEN=softhsm2 cargo nextest run --workspace --locked --lib --bins --tests \
    --no-fail-fast "$@"
took "SoftHSM2 / sled"

# The same integration suite on etcd. etcdstore:: and ha:: already ran above (they start
# their own etcd, or etcd cluster, on either pass); tests that edit sled's files print why
# they skip.
pass "integration suite on token SoftHSM2, store etcd"
STRONGROOM_TEST_TOKEN=softhsm2 STRONGROOM_TEST_STORE=etcd cargo nextest run --locked --test it \
    --no-fail-fast -E 'not test(/^etcdstore::/) and not test(/^ha::/)' "$@"
took "SoftHSM2 / etcd"

kryoptic=$(scripts/kryoptic.sh)
pass "integration suite on token Kryoptic ($kryoptic), store sled"
STRONGROOM_TEST_TOKEN=kryoptic STRONGROOM_TEST_PKCS11_MODULE="$kryoptic" \
    cargo nextest run --locked --test it --no-fail-fast "$@"
took "Kryoptic / sled"
