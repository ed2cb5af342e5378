#!/usr/bin/env bash
# The whole test suite: lint, type check, then unit, integration and system tests against real servers.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "== ruff"; .venv/bin/ruff check kkua_backupd tests bench
echo "== mypy"; .venv/bin/mypy
echo "== pytest"; exec .venv/bin/python -m pytest -q -ra "$@"
