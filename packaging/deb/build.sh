#!/usr/bin/env bash
# packaging/deb/build.sh [OUT_DIR]: build kkua-backupd_<version>_<arch>.deb from this repository.
#
#   packaging/deb/build.sh dist/          # as root or not; needs /usr/bin/python3 (Debian 12), python3-venv,
#                                         # dpkg-deb and fakeroot (scripts/setup.sh installs them)
#
# The package holds the application in /opt/kkua-backupd, a venv of Debian's python3 filled from the pinned
# wheels at build time (nothing is fetched when the package is installed), `kkua-backup` and `kkua-backupd`
# in /usr/bin, the units in /lib/systemd/system, the sysusers/tmpfiles entries in /usr/lib, and
# /etc/kkua-backup/config.toml as a conffile. What the maintainer scripts do: packaging/deb/postinst,
# prerm, postrm; why it is built this way: docs/decisions/0014-debian-package-and-container.md.
#
# Environment: KKUA_DEB_VERSION overrides the version (default: kkua_backupd.__version__ plus "-1");
# KKUA_WHEELS names a folder of wheels made by packaging/wheels.sh (default: built now, from PyPI).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
here=$repo/packaging/deb
out=$(mkdir -p "${1:-$repo/dist}" && cd "${1:-$repo/dist}" && pwd)
python=/usr/bin/python3
app=/opt/kkua-backupd

upstream=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$repo/kkua_backupd/__init__.py")
version=${KKUA_DEB_VERSION:-$upstream-1}
arch=$(dpkg --print-architecture)
pyminor=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
pynext=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1] + 1}")')

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
stage=$work/root
wheels=${KKUA_WHEELS:-}
if [ -z "$wheels" ]; then
  wheels=$work/wheels
  "$repo/packaging/wheels.sh" "$wheels"
fi

# 1. The venv, made at its final path inside the staging root, then every mention of the staging root
#    removed (scripts' #! lines, activate scripts, pyvenv.cfg): venvs are not relocatable, and
#    bin/python stays a link to /usr/bin/python3, which the package depends on.
mkdir -p "$stage$app"
"$python" -m venv "$stage$app"
"$stage$app/bin/python" -m pip install --quiet --disable-pip-version-check --no-index --find-links "$wheels" \
  kkua-backupd
"$stage$app/bin/python" -m pip uninstall --quiet --yes pip setuptools
rm -f "$stage$app"/bin/pip* "$stage$app"/bin/easy_install*
find "$stage$app" -name __pycache__ -type d -prune -exec rm -rf {} +
grep -rlI --null -F "$stage" "$stage$app" | xargs -0 --no-run-if-empty sed -i "s#$stage##g"
if grep -rqF "$stage" "$stage$app"; then
  echo "build.sh: the staging path is still named in: $(grep -rlF "$stage" "$stage$app" | head -3)" >&2
  exit 1
fi
# Wheels' files as Debian wants them: no executable bit on modules and shared libraries (loading needs
# none), shared objects without symbol tables (`strip --strip-unneeded` keeps what the loader uses).
# No byte code is shipped: postinst compiles it and prerm removes it (Debian's way for Python files).
find "$stage$app/lib" -type f \( -name '*.py' -o -name '*.so' -o -name '*.so.*' -o -name '*.pyi' \) \
  -exec chmod 0644 {} +
find "$stage$app/lib" -type f \( -name '*.so' -o -name '*.so.*' \) -exec strip --strip-unneeded {} +
# A module is imported, never run: a `#!` first line on one (prometheus_client has some) only makes lintian
# ask for an executable bit it must not have, so the line goes.
find "$stage$app/lib" -type f -name '*.py' -exec sed -i '1{/^#!/d}' {} +

# 2. Commands, units, users, folders, the conffile, documentation.
install -d "$stage/usr/bin" "$stage/lib/systemd/system/kkua-backup@run.service.d" "$stage/usr/lib/sysusers.d" \
  "$stage/usr/lib/tmpfiles.d" "$stage/etc/kkua-backup" "$stage/usr/share/doc/kkua-backupd" \
  "$stage/usr/share/lintian/overrides"
ln -s "$app/bin/kkua-backup" "$stage/usr/bin/kkua-backup"
ln -s "$app/bin/kkua-backupd" "$stage/usr/bin/kkua-backupd"
install -m 0644 "$repo"/systemd/*.service "$repo"/systemd/*.timer "$stage/lib/systemd/system/"
install -m 0644 "$repo/systemd/kkua-backup@run.service.d/run-all.conf" \
  "$stage/lib/systemd/system/kkua-backup@run.service.d/"
install -m 0644 "$repo/packaging/sysusers.d-kkua-backup.conf" "$stage/usr/lib/sysusers.d/kkua-backup.conf"
install -m 0644 "$repo/packaging/tmpfiles.d-kkua-backup.conf" "$stage/usr/lib/tmpfiles.d/kkua-backup.conf"
install -m 0644 "$repo/packaging/config.toml.example" "$stage/etc/kkua-backup/config.toml"
install -m 0644 "$here/copyright" "$stage/usr/share/doc/kkua-backupd/copyright"
install -m 0644 "$here/lintian-overrides" "$stage/usr/share/lintian/overrides/kkua-backupd"
printf 'kkua-backupd (%s) stable; urgency=medium\n\n  * Built from the kkua-backupd repository (see its git log).\n\n -- KKUA operators <ops@kkua.invalid>  %s\n' \
  "$version" "$(date -R -d "@${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct 2>/dev/null || date +%s)}")" \
  | gzip -9n > "$stage/usr/share/doc/kkua-backupd/changelog.Debian.gz"

# 3. Control files.
install -d "$stage/DEBIAN"
for script in postinst prerm postrm; do
  install -m 0755 "$here/$script" "$stage/DEBIAN/$script"
done
echo /etc/kkua-backup/config.toml > "$stage/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" \
    -e "s/@PYMINOR@/$pyminor/" -e "s/@PYNEXT@/$pynext/" "$here/control.in" > "$stage/DEBIAN/control"
(cd "$stage" && find . -path ./DEBIAN -prune -o -type f -print0 | LC_ALL=C sort -z | xargs -0 md5sum \
  | sed 's#  \./#  #') > "$stage/DEBIAN/md5sums"

deb="$out/kkua-backupd_${version}_${arch}.deb"
fakeroot dpkg-deb --build -Zxz --root-owner-group "$stage" "$deb" >/dev/null
echo "$deb"
