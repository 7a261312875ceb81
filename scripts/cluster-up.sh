#!/usr/bin/env bash
# A local high-availability cluster on loopback, in one command: a 3-member etcd cluster
# (Debian's etcd-server 3.4) with mutual TLS for its clients, and 3 strongroomd replicas that
# share it and one SoftHSM2 development token, with a development PKI. Prints how to talk to
# it. Everything lives under dev/cluster/ (STRONGROOM_CLUSTER_DIR): the token, the PINs, both
# PKIs, etcd's data, each replica's configuration, audit log and logs, and the pid of every
# process it started (run/*.pid), which scripts/cluster-down.sh stops.
#
# Safe to run again: it keeps the token, the PKIs and etcd's data, leaves running processes
# alone and starts only what is missing (a member or replica that died is started again on
# its data). Nothing is ever wiped; to start afresh, run cluster-down.sh and remove the dir.
#
# Ports (loopback only): replicas on STRONGROOM_CLUSTER_PORT+1..3 (default 7451-7453), their
# admin listeners on +11..13 (7461-7463); etcd clients on STRONGROOM_CLUSTER_ETCD_PORT+1..3
# (default 22371-22373), etcd peers on +11..13 (22381-22383).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
state="${STRONGROOM_CLUSTER_DIR:-$root/dev/cluster}"
base="${STRONGROOM_CLUSTER_PORT:-7450}"
etcd_base="${STRONGROOM_CLUSTER_ETCD_PORT:-22370}"
module="${STRONGROOM_PKCS11_MODULE:-/usr/lib/softhsm/libsofthsm2.so}"
label="strongroom-cluster"
members=(1 2 3)
replicas=(1 2 3)

scripts/deps.sh
echo "== building"
cargo build --quiet --bins
bin="$root/target/debug"

mkdir -p "$state/tokens" "$state/secrets" "$state/run" "$state/etcd" "$state/replicas"
chmod 700 "$state/secrets"
run="$state/run"

# Whether the pid recorded in $1 is a live process named $2 (a recycled pid is not ours).
alive() {
    local pidfile=$1 name=$2 pid
    [ -s "$pidfile" ] || return 1
    pid=$(cat "$pidfile")
    kill -0 "$pid" 2>/dev/null && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] \
        && [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]
}

# --- the token: one SoftHSM2 token directory shared by every replica -----------------------
sed "s#@TOKENDIR@#$state/tokens#" softhsm-config/softhsm2.conf.template > "$state/softhsm2.conf"
export SOFTHSM2_CONF="$state/softhsm2.conf"
export STRONGROOM_PKCS11_MODULE="$module" STRONGROOM_TOKEN="$label"
export STRONGROOM_USER_PIN_FILE="$state/secrets/user.pin" STRONGROOM_SO_PIN_FILE="$state/secrets/so.pin"
for pin in so user; do
    f="$state/secrets/$pin.pin"
    [ -s "$f" ] || (umask 077; openssl rand -hex 12 > "$f")
done
if ! "$bin/strongroom-admin" token list --format json | grep -q "\"label\":\"$label\""; then
    echo "== provisioning token '$label'"
    "$bin/strongroom-admin" token init --label "$label"
fi
"$bin/strongroom-admin" key init-mac >/dev/null
if ! "$bin/strongroom-admin" key list --format json | grep -q '"version"'; then
    "$bin/strongroom-admin" key generate
fi

# --- the PKIs: the service's (server, client and admin CAs) and etcd's own ------------------
if [ ! -s "$state/pki/server.pem" ]; then
    "$bin/strongroom-admin" dev-pki --out "$state/pki" --client client=spiffe://strongroom.dev/demo
fi
# etcd's: its server certificate (localhost, 127.0.0.1) from etcd-pki/server-ca.pem, and the
# replicas' client certificate from etcd-pki/client-ca.pem, the only CA etcd trusts.
if [ ! -s "$state/etcd-pki/server.pem" ]; then
    "$bin/strongroom-admin" dev-pki --out "$state/etcd-pki" --client etcd-client=strongroomd.etcd.dev
fi
chmod 600 "$state"/secrets/*.pin "$state"/pki/*-key.pem "$state"/etcd-pki/*-key.pem

# --- etcd: three members on loopback ----------------------------------------------------------
etcd_url() { echo "https://127.0.0.1:$((etcd_base + $1))"; }
peer_url() { echo "http://127.0.0.1:$((etcd_base + 10 + $1))"; }
initial_cluster=""
endpoints=""
for i in "${members[@]}"; do
    initial_cluster+="${initial_cluster:+,}m$i=$(peer_url "$i")"
    endpoints+="${endpoints:+,}$(etcd_url "$i")"
done
ep="$state/etcd-pki"
# etcdctl 3.4 refuses a flag that an ETCDCTL_* variable also sets (as env.sh below does).
unset ETCDCTL_ENDPOINTS ETCDCTL_CACERT ETCDCTL_CERT ETCDCTL_KEY
etcdctl_tls=(--cacert "$ep/server-ca.pem" --cert "$ep/etcd-client.pem" --key "$ep/etcd-client-key.pem")

for i in "${members[@]}"; do
    if alive "$run/etcd-m$i.pid" etcd; then
        echo "== etcd member m$i runs (pid $(cat "$run/etcd-m$i.pid"))"
        continue
    fi
    echo "== starting etcd member m$i on $(etcd_url "$i")"
    # The --initial-* flags matter only on a fresh data directory; on an existing one etcd
    # rejoins with the membership it recorded.
    # Peers talk plain HTTP on loopback; clients (the replicas, etcdctl) need mutual TLS.
    nohup etcd --name "m$i" --data-dir "$state/etcd/m$i" \
        --listen-client-urls "$(etcd_url "$i")" --advertise-client-urls "$(etcd_url "$i")" \
        --listen-peer-urls "$(peer_url "$i")" --initial-advertise-peer-urls "$(peer_url "$i")" \
        --initial-cluster "$initial_cluster" --initial-cluster-state new \
        --initial-cluster-token strongroom-dev-cluster \
        --cert-file "$ep/server.pem" --key-file "$ep/server-key.pem" \
        --trusted-ca-file "$ep/client-ca.pem" --client-cert-auth \
        --max-request-bytes 33554432 --logger zap \
        >> "$state/etcd/m$i.log" 2>&1 &
    echo $! > "$run/etcd-m$i.pid"
done

echo "== waiting for etcd to be healthy"
healthy=""
for _ in $(seq 150); do
    if ETCDCTL_API=3 etcdctl "${etcdctl_tls[@]}" --endpoints "$endpoints" \
        --dial-timeout 2s --command-timeout 3s endpoint health >/dev/null 2>&1; then
        healthy=1
        break
    fi
    for i in "${members[@]}"; do
        alive "$run/etcd-m$i.pid" etcd || {
            echo "etcd member m$i exited:"; tail -20 "$state/etcd/m$i.log"; exit 1
        }
    done
    sleep 0.2
done
if [ -z "$healthy" ]; then
    ETCDCTL_API=3 etcdctl "${etcdctl_tls[@]}" --endpoints "$endpoints" endpoint health || true
    echo "etcd did not become healthy; see $state/etcd/m*.log"
    exit 1
fi

# --- strongroomd: three replicas ----------------------------------------------------------------
# Every replica's configuration comes from here. Each replica has its own listeners, audit
# log and logs; the etcd cluster, the token and the PKI are shared.
write_replica_config() {
    local n=$1
    local dir="$state/replicas/r$n"
    mkdir -p "$dir"
    local etcd_list=""
    for i in "${members[@]}"; do etcd_list+="${etcd_list:+, }\"$(etcd_url "$i")\""; done
    cat > "$state/replica-r$n.toml" <<TOML
# Replica r$n of the development cluster, written by scripts/cluster-up.sh (rewritten on
# every run: edit the script, not this file). Relative paths are relative to this file.
[server]
listen = "127.0.0.1:$((base + n))"
cert = "pki/server.pem"
key = "pki/server-key.pem"
client_ca = "pki/client-ca.pem"
replica_id = "r$n"

[hsm]
module = "$module"
token = "$label"
pin_file = "secrets/user.pin"

[store]
backend = "etcd"
endpoints = [$etcd_list]
ca = "etcd-pki/server-ca.pem"
cert = "etcd-pki/etcd-client.pem"
key = "etcd-pki/etcd-client-key.pem"

[audit]
path = "replicas/r$n/audit.log"

[admin]
listen = "127.0.0.1:$((base + 10 + n))"
cert = "pki/server.pem"
key = "pki/server-key.pem"
ca = "pki/admin-ca.pem"
officers = ["officer.strongroom.dev"]
quorum = 1
dangerous_single_officer = true

[[policy]]
identity = "spiffe://strongroom.dev/demo"
prefix = "demo"
capabilities = ["read", "write", "list", "delete"]
TOML
}

started=()
for n in "${replicas[@]}"; do
    write_replica_config "$n"
    if alive "$run/strongroomd-r$n.pid" strongroomd; then
        echo "== replica r$n runs (pid $(cat "$run/strongroomd-r$n.pid"))"
        continue
    fi
    echo "== starting replica r$n on 127.0.0.1:$((base + n))"
    out="$state/replicas/r$n/strongroomd.out"
    : > "$out"
    nohup "$bin/strongroomd" --config "$state/replica-r$n.toml" \
        > "$out" 2>> "$state/replicas/r$n/strongroomd.log" &
    echo $! > "$run/strongroomd-r$n.pid"
    started+=("$n")
done
for n in "${started[@]}"; do
    out="$state/replicas/r$n/strongroomd.out"
    for _ in $(seq 300); do
        grep -q "^listening on" "$out" && break
        alive "$run/strongroomd-r$n.pid" strongroomd || break
        sleep 0.1
    done
    grep -q "^listening on" "$out" || {
        echo "replica r$n did not start:"; tail -20 "$state/replicas/r$n/strongroomd.log"; exit 1
    }
done

addrs=""
for n in "${replicas[@]}"; do addrs+="${addrs:+,}https://localhost:$((base + n))"; done
cat > "$state/env.sh" <<ENV
# Written by scripts/cluster-up.sh: the CLIs against the development cluster.
export PATH="$bin:\$PATH"
export STRONGROOM_ADDR=$addrs
export STRONGROOM_CACERT=$state/pki/server-ca.pem
export STRONGROOM_CLIENT_CERT=$state/pki/client.pem
export STRONGROOM_CLIENT_KEY=$state/pki/client-key.pem
export STRONGROOM_ADMIN_ADDR=https://localhost:$((base + 11))
export STRONGROOM_ADMIN_CACERT=$state/pki/server-ca.pem
export STRONGROOM_ADMIN_CERT=$state/pki/officer.pem
export STRONGROOM_ADMIN_KEY=$state/pki/officer-key.pem
export SOFTHSM2_CONF=$state/softhsm2.conf
export STRONGROOM_PKCS11_MODULE=$module
export STRONGROOM_TOKEN=$label
export STRONGROOM_USER_PIN_FILE=$state/secrets/user.pin
export ETCDCTL_API=3 ETCDCTL_ENDPOINTS=$endpoints
export ETCDCTL_CACERT=$ep/server-ca.pem ETCDCTL_CERT=$ep/etcd-client.pem ETCDCTL_KEY=$ep/etcd-client-key.pem
ENV
# shellcheck source=/dev/null
. "$state/env.sh"

echo "== check: write through r1, read back through r3"
# A replica whose etcd connection to a member that just (re)started is still in backoff may
# answer UNAVAILABLE for a moment: try again, a bounded number of times.
for try in $(seq 20); do
    printf 'hello from the cluster' | STRONGROOM_ADDR="https://localhost:$((base + 1))" strongroom put demo/cluster/hello && break
    [ "$try" -lt 20 ] || exit 1
    sleep 0.5
done
echo "read back through r3: $(STRONGROOM_ADDR="https://localhost:$((base + 3))" strongroom get demo/cluster/hello --field value)"

rel=${state#"$root"/}
cat <<DONE

The cluster runs: etcd members m1-m3 ($endpoints), replicas r1-r3 ($addrs).
State, logs and pids under $rel/ (replicas/rN/strongroomd.log, etcd/mN.log, run/*.pid).
Talk to it (the client fails over between the replicas in STRONGROOM_ADDR):
  . $rel/env.sh
  printf 's3cret' | strongroom put demo/db/password
  strongroom get demo/db/password
  strongroom list demo
  strongroom-admin key list                # the shared token
  etcdctl endpoint status -w table         # which etcd member leads
Try a failure: kill -9 \$(cat $rel/run/strongroomd-r1.pid); strongroom get demo/db/password
Run scripts/cluster-up.sh again to start what is missing; scripts/cluster-down.sh stops it all.
DONE
