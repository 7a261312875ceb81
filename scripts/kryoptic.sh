#!/usr/bin/env bash
# Builds Kryoptic (a PKCS#11 soft token in Rust over OpenSSL; the `kryoptic` crate) from the
# crate registry, once, and caches the module outside the repository:
#   ${XDG_CACHE_HOME:-~/.cache}/strongroom/kryoptic-<version>/libkryoptic_pkcs11.so
# A second run finds the cached module and returns at once. Prints the module's path on stdout
# (everything else goes to stderr), so `module=$(scripts/kryoptic.sh)` works.
#
# Features: the crate's default `standard` set pulls EdDSA, which needs OpenSSL 3.2; Debian 12
# has 3.0. So: no default features, and from kryoptic-lib only what strongroom uses:
#   dynamic   link the system's libcrypto (OpenSSL 3.0) instead of building OpenSSL
#   sqlitedb  token storage in one sqlite file (the system's libsqlite3)
#   aes       AES-GCM, AES-KW/KWP (envelope and strict modes)
#   hash_all  SHA-2 and HMAC (the audit chain's MAC keys)
# Build needs: libssl-dev, libsqlite3-dev, pkg-config, and libclang-dev (bindgen generates
# the OpenSSL bindings).
set -euo pipefail

VERSION="${KRYOPTIC_VERSION:-1.5.4}"
FEATURES="kryoptic-lib/dynamic,kryoptic-lib/sqlitedb,kryoptic-lib/aes,kryoptic-lib/hash_all"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/strongroom/kryoptic-$VERSION"
MODULE="$CACHE/libkryoptic_pkcs11.so"

if [ -s "$MODULE" ]; then
    echo "$MODULE"
    exit 0
fi

need=()
for pkg in libssl-dev libsqlite3-dev libclang-dev pkg-config; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "installing for Kryoptic: ${need[*]}" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        "${need[@]}" >/dev/null
fi

echo "building Kryoptic $VERSION (once; cached in $CACHE)" >&2
start=$(date +%s)
mkdir -p "$CACHE"
work="$CACHE/build"
rm -rf "$work"
mkdir -p "$work/fetch/src"
# Kryoptic is a library crate (`cargo install` refuses it): fetch its source through a
# throwaway crate that depends on it, then build the package itself with its own Cargo.lock.
cat >"$work/fetch/Cargo.toml" <<EOF
[package]
name = "kryoptic-fetch"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
kryoptic = { version = "=$VERSION", default-features = false }
EOF
: >"$work/fetch/src/lib.rs"
(cd "$work/fetch" && cargo fetch --quiet >&2)
manifest=$(cd "$work/fetch" && cargo metadata --format-version 1 --offline 2>/dev/null |
    grep -o "\"manifest_path\":\"[^\"]*/kryoptic-$VERSION/Cargo.toml\"" | head -n 1 |
    sed 's/^"manifest_path":"//; s/"$//')
if [ -z "$manifest" ] || [ ! -f "$manifest" ]; then
    echo "kryoptic $VERSION: source not found after cargo fetch" >&2
    exit 1
fi
# Build a copy: the registry's source folder stays untouched.
cp -r "$(dirname "$manifest")" "$work/src"
(cd "$work/src" && cargo build --release --locked --quiet --no-default-features \
    --features "$FEATURES" --target-dir "$work/target" >&2)
cp "$work/target/release/libkryoptic_pkcs11.so" "$MODULE.tmp"
mv "$MODULE.tmp" "$MODULE"
rm -rf "$work"
echo "built $MODULE in $(($(date +%s) - start)) s" >&2
echo "$MODULE"
