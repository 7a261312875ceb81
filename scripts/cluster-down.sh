#!/usr/bin/env bash
# Stops what scripts/cluster-up.sh started: the strongroomd replicas first, then the etcd
# members, each by the pid it recorded under dev/cluster/run (STRONGROOM_CLUSTER_DIR), with
# SIGTERM and, after 15 s, SIGKILL. A pid that no longer names the process it recorded (it
# exited and the number was reused) is left alone. Keeps every file: the token, the PKIs,
# etcd's data and the audit logs stay for the next cluster-up.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
state="${STRONGROOM_CLUSTER_DIR:-$(pwd)/dev/cluster}"
run="$state/run"
[ -d "$run" ] || { echo "no cluster state under $state"; exit 0; }

# stop PIDFILE NAME: stops the recorded process if it is still the one recorded.
stop() {
    local pidfile=$1 name=$2 pid
    [ -s "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] \
        && [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]; then
        echo "== stopping $(basename "$pidfile" .pid) (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 150); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "   still running after 15 s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
}

shopt -s nullglob
for f in "$run"/strongroomd-*.pid; do stop "$f" strongroomd; done
for f in "$run"/etcd-*.pid; do stop "$f" etcd; done
echo "stopped; data kept under $state"
