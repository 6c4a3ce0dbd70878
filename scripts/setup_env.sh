#!/usr/bin/env bash
# Creates (or reuses) the project's virtualenv and links it as ./.venv.
#   PYTHON=python3.12 bash scripts/setup_env.sh    # another interpreter (default: python3)
# One venv per Python version and dependency set, outside the clone so fresh clones reuse it:
#   ${SKIPCLICK_CACHE:-~/.cache/skipclick-jax}/venv-py<X.Y.Z>-<hash of the interpreter,
#   pyproject.toml's [project] requirements and this script>
# Installs the package (editable) with the test, export, app and gcs extras, plus the torch extra
# (converters, parity tests) on Python 3.11, the only version with local torch wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
jax2onnx="jax2onnx==0.17.1"  # its own orbax pin clashes with ours: installed with --no-deps
if ! pyver=$("$python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])'); then
  echo "setup: cannot run PYTHON=$python" >&2
  exit 1
fi
case "$pyver" in
  3.11.*) extras="test,torch,export,app,gcs" ;;
  3.1[2-9].*) extras="test,export,app,gcs" ;;
  *) echo "setup: Python $pyver from $python is unsupported (need >= 3.11)" >&2; exit 1 ;;
esac
# The dependency set: [project]'s requirements and [build-system]'s (setuptools, kept in the venv
# so the editable install can be re-pointed without build isolation), with the interpreter.
read_toml='import json, sys, tomllib; toml = tomllib.load(open("pyproject.toml", "rb"))'
build_reqs=$("$python" -c "$read_toml"'; print(" ".join(toml["build-system"]["requires"]))')
deps=$("$python" -c "$read_toml"'; project = toml["project"]; print(sys.version, sys.base_prefix)
print(json.dumps([project.get(k) for k in ("requires-python", "dependencies", "optional-dependencies")]))')
key=$({ echo "$build_reqs"; echo "$deps"; cat scripts/setup_env.sh; } | sha256sum | cut -c1-16)
venv="${SKIPCLICK_CACHE:-$HOME/.cache/skipclick-jax}/venv-py$pyver-$key"
if [ ! -f "$venv/.complete" ]; then
  echo "setup: creating $venv (Python $pyver; first run installs jax, flax, ...; a few minutes)" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip $build_reqs
  "$venv/bin/pip" install -q -e ".[$extras]"
  "$venv/bin/pip" install -q --no-deps "$jax2onnx"
  touch "$venv/.complete"
elif ! log=$("$venv/bin/pip" install -q --no-deps --no-build-isolation -e . 2>&1); then
  echo "$log" >&2
  exit 1
fi
ln -sfn "$venv" .venv
