#!/usr/bin/env bash
# Installs what strongroom needs on a Debian machine, if missing: SoftHSM2 (the PKCS#11 token
# for development and tests), OpenSC's pkcs11-tool (to inspect tokens independently of our
# code), fuse3 (the power-cut simulator's mount helper) and cargo-nextest. protoc comes vendored through Cargo (protoc-bin-vendored).
set -euo pipefail

need=()
[ -e /usr/lib/softhsm/libsofthsm2.so ] || need+=(softhsm2)
command -v pkcs11-tool >/dev/null 2>&1 || need+=(opensc)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# fuse3: fusermount3, for the power-cut simulator (crates/powercut) when not run as root.
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
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
