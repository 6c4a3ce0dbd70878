#!/usr/bin/env bash
# Creates (or reuses) the project's virtualenv and links it as ./.venv.
# The venv lives outside the clone, keyed by the dependency file, so fresh clones reuse it:
#   ${SKIPCLICK_CACHE:-~/.cache/skipclick-jax}/venv-<hash of pyproject.toml>
# Installs the package (editable) with the `test` and `torch` extras (torch: converters, parity tests).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
key=$(sha256sum pyproject.toml | cut -c1-16)
venv="${SKIPCLICK_CACHE:-$HOME/.cache/skipclick-jax}/venv-$key"
if [ ! -f "$venv/.complete" ]; then
  echo "setup: creating $venv (first run installs jax, flax, torch, ...; a few minutes)" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -e ".[test,torch]"
  touch "$venv/.complete"
elif ! log=$("$venv/bin/pip" install -q --no-deps --no-build-isolation -e . 2>&1); then
  echo "$log" >&2
  exit 1
fi
ln -sfn "$venv" .venv
