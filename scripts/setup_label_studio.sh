#!/usr/bin/env bash
# Builds (once) a separate venv with the Label Studio server for the Label Studio integration
# tests, and a migrated data-dir template beside it (a fresh data dir takes ~45 s to migrate at
# every start; a copy of the template starts in a few seconds).
#
#   bash scripts/setup_label_studio.sh      prints the venv's directory on stdout
#
# Label Studio pins its own Django/numpy/pydantic stack, so it never goes into the project venv.
# The venv lives in ${SKIPCLICK_CACHE:-~/.cache/skipclick-jax}/label-studio-venv-<hash> (the hash
# covers the Label Studio version, the interpreter and this script), built under a lock so that
# parallel CI legs share one build; a finished build is marked by the file .complete.
# Environment: SKIPCLICK_LS_PYTHON (interpreter, default python3), SKIPCLICK_LS_TIMEOUT (seconds
# for the whole build, default 900). Exit status non-zero when the venv cannot be built.
set -euo pipefail

LS_VERSION=1.23.2
py=${SKIPCLICK_LS_PYTHON:-python3}
limit=${SKIPCLICK_LS_TIMEOUT:-900}
cache=${SKIPCLICK_CACHE:-$HOME/.cache/skipclick-jax}
pyver=$("$py" -c 'import sys; print(sys.version.split()[0])')
key=$( { echo "$LS_VERSION $pyver"; cat "$0"; } | sha256sum | cut -c1-16)
venv=$cache/label-studio-venv-$key
mkdir -p "$cache"

build() {
  [ -f "$venv/.complete" ] && return 0
  rm -rf "$venv"
  echo "setup_label_studio: building $venv (label-studio==$LS_VERSION, Python $pyver)" >&2
  local start=$SECONDS
  "$py" -m venv "$venv"
  if ! "$venv/bin/python" -m pip install -q "label-studio==$LS_VERSION" >"$venv/pip.log" 2>&1; then
    tail -20 "$venv/pip.log" >&2
    return 1
  fi
  # The migrated, empty data dir that the test fixture copies (no users, no projects): every
  # label-studio command applies the database migrations first.
  mkdir -p "$venv/data-template"
  LABEL_STUDIO_BASE_DATA_DIR=$venv/data-template LATEST_VERSION_CHECK=false \
    COLLECT_ANALYTICS=false SENTRY_DSN= FRONTEND_SENTRY_DSN= \
    "$venv/bin/label-studio" version >"$venv/migrate.log" 2>&1 || { tail -20 "$venv/migrate.log" >&2; return 1; }
  touch "$venv/.complete"
  echo "setup_label_studio: built in $((SECONDS - start)) s" >&2
  # Venvs of other versions of this script (about 1 GB each) are not used any more.
  find "$(dirname "$venv")" -maxdepth 1 -name 'label-studio-venv-*' ! -path "$venv" -exec rm -rf {} +
}

export -f build
export venv py pyver LS_VERSION
# flock: one build at a time across processes; timeout bounds the whole build.
if ! timeout "$limit" flock "$cache/label-studio.lock" bash -c 'set -euo pipefail; build'; then
  echo "setup_label_studio: could not build $venv within $limit s" >&2
  exit 1
fi
echo "$venv"
