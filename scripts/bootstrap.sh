#!/usr/bin/env bash
# Prepare a fresh Debian/Ubuntu machine: Python 3.11+ venv with the project, and Mosquitto.
# Idempotent; `make demo` and `make test` call it.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo "$@"
  else echo "bootstrap: needs root for: $*" >&2; echo "run it yourself, then retry" >&2; exit 1
  fi
}
apt_updated=""
apt_install() {
  [ -n "$apt_updated" ] || { as_root apt-get update -qq; apt_updated=1; }
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "bootstrap: Python 3.11 or newer is required (found: $("$PYTHON" --version 2>&1))" >&2
  exit 1
fi

if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then
  echo "bootstrap: installing mosquitto (apt-get install -y mosquitto)"
  apt_install mosquitto
fi

# The tests also check the unit file with systemd-analyze (absent from slim containers).
if [ -n "${WITH_TEST_TOOLS:-}" ] && ! command -v systemd-analyze >/dev/null; then
  echo "bootstrap: installing systemd (for systemd-analyze verify)"
  apt_install systemd
fi

# The fault suite cuts a network link between an agent and the broker with network namespaces
# and veth pairs (tests/faults/test_partition.py).
if [ -n "${WITH_TEST_TOOLS:-}" ] && ! command -v ip >/dev/null; then
  echo "bootstrap: installing iproute2 (for the fault suite's network namespaces)"
  apt_install iproute2
fi

# The dashboard's browser test drives headless Chromium over the DevTools protocol. On Ubuntu
# the chromium package is a wrapper that installs a snap, which does not run in a container:
# `command -v` finds it all the same, so the check runs it.
chromium_runs() { timeout 60 chromium --headless --no-sandbox --disable-gpu --version >/dev/null 2>&1; }
if [ -n "${WITH_TEST_TOOLS:-}" ]; then
  if ! command -v chromium >/dev/null; then
    echo "bootstrap: installing chromium (for the dashboard's browser test)"
    apt_install chromium
  fi
  if ! chromium_runs; then
    echo "bootstrap: 'chromium --headless --no-sandbox --version' fails here: $(command -v chromium)" >&2
    echo "it is probably Ubuntu's snap wrapper; install Debian's chromium package instead" >&2
    echo "(a Debian image, or Debian's archive pinned for chromium), then retry" >&2
    exit 1
  fi
fi

if [ ! -x .venv/bin/python ]; then
  if ! "$PYTHON" -m venv .venv 2>/dev/null; then
    rm -rf .venv
    echo "bootstrap: installing python3-venv"
    apt_install python3-venv
    "$PYTHON" -m venv .venv
  fi
fi
stamp=.venv/.installed
# A strict editable install is a tree of links that mypy can follow; it must be redone when a
# module is added, which changes its folder's mtime.
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] \
   || [ -n "$(find proto agent controller sdk systemd -type d -newer "$stamp" 2>/dev/null)" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[${EXTRAS:-dev}]" --config-settings editable_mode=strict
  touch "$stamp"
fi
