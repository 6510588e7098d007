#!/usr/bin/env bash
# Runs the Leap0 Python SDK compatibility tests (tests/sdk) against `cove server`.
#
# The venv lives outside the repository (COVE_SDK_VENV, default $COVE_CACHE_DIR/sdk-venv) and
# is created on first use with a Python >= 3.12 ($PYTHON if set): leap0 0.8.0 cannot be imported
# on 3.11, whatever its metadata says. The server binary is COVE_BIN (default
# target/debug/cove; build it with `cargo build -p cove`). Extra arguments go to pytest.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${COVE_SDK_VENV:-${COVE_CACHE_DIR:-/var/cache/cove}/sdk-venv}"

new_enough() {
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

find_python() {
    local c
    if [ -n "${PYTHON:-}" ]; then
        new_enough "$PYTHON" && { echo "$PYTHON"; return 0; }
        echo "run.sh: PYTHON=$PYTHON is not Python >= 3.12" >&2
        return 1
    fi
    local pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}"
    for c in python3.13 python3.12 \
        $(ls -d "$pyenv_root"/versions/3.1[2-9]*/bin/python3 2>/dev/null | sort -rV) \
        python3; do
        if new_enough "$c"; then
            echo "$c"
            return 0
        fi
    done
    echo "run.sh: no Python >= 3.12 found (set PYTHON=/path/to/python3.12)" >&2
    return 1
}

if [ -x "$venv/bin/python" ] && ! new_enough "$venv/bin/python"; then
    echo "run.sh: $venv has a Python older than 3.12; recreating it" >&2
    rm -rf "$venv"
fi
if [ ! -x "$venv/bin/python" ]; then
    python="$(find_python)"
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv"
fi

# (Re)install only when requirements.txt changed since the last successful install.
stamp="$venv/.cove-requirements.sha256"
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/requirements.txt"
    echo "$want" >"$stamp"
fi

export COVE_BIN="${COVE_BIN:-$repo/target/debug/cove}"
if [ ! -x "$COVE_BIN" ]; then
    echo "run.sh: $COVE_BIN not found; build it with: cargo build -p cove" >&2
    exit 1
fi

# The SDK must not try to export telemetry anywhere.
export LEAP0_SDK_OTEL_ENABLED=false
unset OTEL_EXPORTER_OTLP_ENDPOINT OTEL_EXPORTER_OTLP_HEADERS

set +e
PYTHONDONTWRITEBYTECODE=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider "$here" "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "run.sh: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
