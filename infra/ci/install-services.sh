#!/usr/bin/env bash
# Install the system services the @pytest.mark.services tests start on loopback (a fresh CI machine has none):
# PostgreSQL server binaries (Debian/Ubuntu `postgresql`) and a headless browser (`chromium`, for the MLflow UI
# check in tests/test_lineage_ui.py). The tests create, start and delete their own throwaway cluster; nothing is
# started here, and the distribution's default cluster is left stopped.
# S3 (moto), MLflow and Ray come from the project's virtualenv. Idempotent: does nothing when already present.
set -euo pipefail

have_postgres() {
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null
}
# Debian's chromium: the browser tests/test_lineage_ui.py drives through Playwright (never `playwright install`).
have_chromium() { [ -x /usr/bin/chromium ]; }

if have_postgres && have_chromium; then
  echo "install-services: PostgreSQL server binaries and chromium present"
  exit 0
fi

if ! command -v apt-get >/dev/null; then
  echo "install-services: PostgreSQL (initdb, postgres) or /usr/bin/chromium is missing and this is not a" \
    "Debian/Ubuntu system; install the PostgreSQL server and chromium with the system's package manager" >&2
  exit 1
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi
packages=()
have_postgres || packages+=(postgresql)
have_chromium || packages+=(chromium)
echo "install-services: installing ${packages[*]} (apt-get install)"
$sudo apt-get update -q
# policy-rc.d exit 101: the package must not start its default cluster (the tests run their own).
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
  $sudo chmod +x /usr/sbin/policy-rc.d
  trap '$sudo rm -f /usr/sbin/policy-rc.d' EXIT
fi
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${packages[@]}"
have_postgres || { echo "install-services: postgresql installed but initdb not found" >&2; exit 1; }
have_chromium || { echo "install-services: chromium installed but /usr/bin/chromium not found" >&2; exit 1; }
echo "install-services: ${packages[*]} installed"
