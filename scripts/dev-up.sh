#!/usr/bin/env bash
# One command from a fresh Debian machine to a running strongroom with a demo:
# installs what is missing, builds, provisions a dev SoftHSM2 token with a master key under
# ./dev, writes a dev PKI, starts strongroomd in the background, stores and reads back a demo
# secret, and prints how to talk to the service. Safe to run again: it reuses ./dev and
# restarts the service.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
dev="$root/dev"
port="${STRONGROOM_DEMO_PORT:-7443}"
module="${STRONGROOM_PKCS11_MODULE:-/usr/lib/softhsm/libsofthsm2.so}"
label="strongroom-dev"

scripts/deps.sh
echo "== building"
cargo build --quiet --bins
bin="$root/target/debug"

mkdir -p "$dev/tokens" "$dev/secrets"
chmod 700 "$dev/secrets"
sed "s#@TOKENDIR@#$dev/tokens#" softhsm-config/softhsm2.conf.template > "$dev/softhsm2.conf"
export SOFTHSM2_CONF="$dev/softhsm2.conf"
export STRONGROOM_PKCS11_MODULE="$module" STRONGROOM_TOKEN="$label"
export STRONGROOM_USER_PIN_FILE="$dev/secrets/user.pin" STRONGROOM_SO_PIN_FILE="$dev/secrets/so.pin"
for pin in so user; do
    f="$dev/secrets/$pin.pin"
    [ -s "$f" ] || (umask 077; openssl rand -hex 12 > "$f")
done

if ! "$bin/strongroom-admin" token list --format json | grep -q "\"label\":\"$label\""; then
    echo "== provisioning token '$label'"
    "$bin/strongroom-admin" token init --label "$label"
fi
# MAC keys for the audit chain and policies (tokens made before they existed lack them).
"$bin/strongroom-admin" key init-mac >/dev/null
if ! "$bin/strongroom-admin" key list --format json | grep -q '"version"'; then
    "$bin/strongroom-admin" key generate
fi
"$bin/strongroom-admin" doctor

if [ ! -s "$dev/pki/server.pem" ]; then
    "$bin/strongroom-admin" dev-pki --out "$dev/pki" --client client=spiffe://strongroom.dev/demo
fi
# strongroomd refuses a PIN file or private key open to group or others; the files above
# are made 0600, and this also fixes a ./dev from before that rule.
chmod 600 "$dev"/secrets/*.pin "$dev"/pki/*-key.pem

cat > "$dev/strongroomd.toml" <<TOML
# Development configuration written by scripts/dev-up.sh.
[server]
listen = "127.0.0.1:$port"
cert = "pki/server.pem"
key = "pki/server-key.pem"
client_ca = "pki/client-ca.pem"

[hsm]
module = "$module"
token = "$label"
pin_file = "secrets/user.pin"

[store]
path = "store"

[[policy]]
identity = "spiffe://strongroom.dev/demo"
prefix = "demo"
capabilities = ["read", "write", "list", "delete"]
TOML

if [ -s "$dev/strongroomd.pid" ] && kill -0 "$(cat "$dev/strongroomd.pid")" 2>/dev/null; then
    echo "== stopping the previous strongroomd"
    kill "$(cat "$dev/strongroomd.pid")"
    while kill -0 "$(cat "$dev/strongroomd.pid")" 2>/dev/null; do sleep 0.1; done
fi
echo "== starting strongroomd on 127.0.0.1:$port"
: > "$dev/strongroomd.out"
nohup "$bin/strongroomd" --config "$dev/strongroomd.toml" > "$dev/strongroomd.out" 2> "$dev/strongroomd.log" &
echo $! > "$dev/strongroomd.pid"
for _ in $(seq 100); do
    grep -q "listening on" "$dev/strongroomd.out" && break
    kill -0 "$(cat "$dev/strongroomd.pid")" 2>/dev/null || { cat "$dev/strongroomd.log"; exit 1; }
    sleep 0.1
done
grep -q "listening on" "$dev/strongroomd.out" || { echo "strongroomd did not start"; cat "$dev/strongroomd.log"; exit 1; }

cat > "$dev/env.sh" <<ENV
export PATH="$bin:\$PATH"
export STRONGROOM_ADDR=https://localhost:$port
export STRONGROOM_CACERT=$dev/pki/server-ca.pem
export STRONGROOM_CLIENT_CERT=$dev/pki/client.pem
export STRONGROOM_CLIENT_KEY=$dev/pki/client-key.pem
export SOFTHSM2_CONF=$dev/softhsm2.conf
export STRONGROOM_PKCS11_MODULE=$module
export STRONGROOM_TOKEN=$label
export STRONGROOM_USER_PIN_FILE=$dev/secrets/user.pin
ENV
# shellcheck source=/dev/null
. "$dev/env.sh"

echo "== demo: store and read back demo/hello"
printf 'hello from the token' | strongroom put demo/hello
echo "read back: $(strongroom get demo/hello --field value)"
strongroom describe demo/hello

cat <<DONE

strongroomd is running (pid $(cat "$dev/strongroomd.pid"), logs in dev/strongroomd.log).
Talk to it:
  . dev/env.sh
  printf 's3cret' | strongroom put demo/db/password
  strongroom get demo/db/password
  strongroom list demo
  strongroom-admin key list
Stop it:  kill \$(cat dev/strongroomd.pid)
DONE
