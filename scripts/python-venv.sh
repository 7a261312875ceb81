#!/usr/bin/env bash
# The Python example's environment (examples/python): a venv outside the repository,
#   ${XDG_CACHE_HOME:-~/.cache}/strongroom/venv
# with examples/python/requirements.txt installed (pinned grpcio, grpcio-tools, protobuf).
# Debian 12 refuses `pip install` into the system Python (PEP 668), hence the venv. Reinstalls
# only when requirements.txt changes. Prints the venv's python on stdout (the rest goes to
# stderr), so `py=$(scripts/python-venv.sh)` works. Needs python3 and python3-venv
# (scripts/deps.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${XDG_CACHE_HOME:-$HOME/.cache}/strongroom/venv"
REQ=examples/python/requirements.txt
# Debian's Python, which deps.sh installs; another python3 on PATH only if it is missing.
PY=/usr/bin/python3
[ -x "$PY" ] || PY=$(command -v python3)

want=$(sha256sum "$REQ" | cut -d' ' -f1)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" = "$want" ]; then
    echo "$VENV/bin/python"
    exit 0
fi
echo "setting up the Python example's venv in $VENV" >&2
rm -rf "$VENV"
"$PY" -m venv "$VENV" >&2
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQ" >&2
echo "$want" >"$VENV/.requirements.sha256"
echo "$VENV/bin/python"
