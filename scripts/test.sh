#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian machine, then run the whole suite.
# Used as-is by the README and by .ci/run, so a developer and CI run exactly the same thing.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: Chromium for the browser tests (issue 7). Needs root and apt; skipped otherwise, in which case the
# browser tests skip with one reason line (CI sets CORSPROXY_REQUIRE_BROWSER=1 so that they can never skip there).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi

# PostgreSQL for the fleet-mode tests (a throwaway cluster per test session, run as an unprivileged user): the same
# rule; without it those tests skip with one reason line, and CI sets CORSPROXY_REQUIRE_POSTGRESQL=1.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends postgresql >/dev/null
fi

VENV="${CORSPROXY_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q -e '.[test,speed]'  # speed: uvloop, which serve uses when present

exec "$VENV/bin/python" -m pytest "$@"
