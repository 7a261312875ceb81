#!/usr/bin/env bash
# The whole test suite: format, lints, docs, then every test against real SoftHSM2 tokens,
# real mutual TLS on loopback and real sled stores, then the integration suite again on the
# etcd backend (each test starts its own etcd). cargo-nextest runs each test in its own
# process (PKCS#11 allows one C_Initialize per process, and each test has its own token).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo doc"
RUSTDOCFLAGS=-Dwarnings cargo doc --no-deps --locked --quiet
echo "== fuzz (short run; FUZZ_SECONDS per target)"
FUZZ_SECONDS="${FUZZ_SECONDS:-15}" scripts/fuzz.sh
echo "== tests (sled store)"
cargo nextest run --workspace --locked --lib --bins --tests --no-fail-fast "$@"
# The same integration suite on etcd. etcdstore:: and ha:: already ran above (they start
# their own etcd, or etcd cluster, on either pass); tests that edit sled's files print why
# they skip.
echo "== integration tests (etcd store)"
STRONGROOM_TEST_STORE=etcd cargo nextest run --locked --test it --no-fail-fast \
    -E 'not test(/^etcdstore::/) and not test(/^ha::/)' "$@"
