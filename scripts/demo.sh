#!/usr/bin/env bash
# The main job on a built-in default: a throwaway PostgreSQL with sample data is backed up, verified and
# restored with the real CLI, and the restored database is compared with the source.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m kkua_backupd.demo "$@"
