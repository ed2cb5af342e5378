#!/usr/bin/env bash
# packaging/wheels.sh OUT_DIR: the wheels of kkua-backupd and of its runtime dependencies at the versions
# pinned in requirements.lock, built with Debian 12's /usr/bin/python3 (the interpreter the .deb and the
# container run: a wheel resolved with another patch release can lack a dependency, see docs/install.md).
# Both packaging/deb/build.sh and the container build install from these with `pip install --no-index`.
# Needs the network (PyPI) once; pip's cache makes later runs quick.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: packaging/wheels.sh OUT_DIR" >&2; exit 2; }
repo=$(cd "$(dirname "$0")/.." && pwd)
out=$1
python=${KKUA_PYTHON:-/usr/bin/python3}
mkdir -p "$out"
builder=$(mktemp -d)
trap 'rm -rf "$builder"' EXIT
"$python" -m venv "$builder/venv"
# Constraints, not requirements: only what the project needs at run time is built, at the locked versions.
"$builder/venv/bin/python" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$out" \
  -c "$repo/requirements.lock" "$repo"
ls "$out"/kkua_backupd-*.whl >/dev/null
