#!/usr/bin/env bash
# Installs what strongroom needs on a Debian machine, if missing: SoftHSM2 (the PKCS#11 token
# for development and tests), OpenSC's pkcs11-tool (to inspect tokens independently of our
# code), etcd (the etcd store backend's tests start their own etcd-server 3.4; etcdctl from
# etcd-client to inspect it), protoc (Debian's protobuf-compiler: the etcd-client crate's
# build script needs one on PATH; our own schemas use the vendored protoc-bin-vendored),
# fuse3 (the power-cut simulator's mount helper), python3 and python3-venv (the Python client
# example, examples/python) and cargo-nextest. Then, cached outside the repository under
# ~/.cache/strongroom: Kryoptic, the second PKCS#11 token of the tests (scripts/kryoptic.sh,
# built once from the crate registry, about a minute), and the Python example's venv
# (scripts/python-venv.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
[ -e /usr/lib/softhsm/libsofthsm2.so ] || need+=(softhsm2)
command -v pkcs11-tool >/dev/null 2>&1 || need+=(opensc)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# fuse3: fusermount3, for the power-cut simulator (crates/powercut) when not run as root.
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
dpkg -s python3 >/dev/null 2>&1 || need+=(python3)
dpkg -s python3-venv >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ! cargo nextest --version >/dev/null 2>&1; then
    echo "installing cargo-nextest"
    cargo install --locked cargo-nextest
fi
scripts/kryoptic.sh >/dev/null
scripts/python-venv.sh >/dev/null
