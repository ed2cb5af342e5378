"""SSH hosts through Debian's `ssh` and `rsync` binaries (docs/remotes.md).

Every connection uses BatchMode (never a prompt), the configured key only (IdentitiesOnly), and the
configured known_hosts file with StrictHostKeyChecking=yes: an unknown or changed host key is refused, never
learnt. A file is copied by rsync to `NAME.partial`, its size and sha256 are computed on the host and
compared with the manifest, and only then is it renamed to NAME; a killed upload leaves only a `.partial`
name, which listings ignore and the next push replaces. The key's path is on the command line, never the key.
The host needs a POSIX shell with coreutils, find and rsync (any Debian or Ubuntu server has them).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from kkua_backupd.config import RemoteConfig
from kkua_backupd.errors import CommandFailed
from kkua_backupd.proc import execute
from kkua_backupd.remote import TEMP_SUFFIX, DeleteRefused, PutResult, RemoteError, RemoteObject

UPLOAD_TIMEOUT = 6 * 3600  # the whole copy of one file; stalls end sooner through rsync --timeout
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_DENIED = ("Permission denied", "Read-only file system", "Operation not permitted")


def ssh_options(config: RemoteConfig, *, timeout: float, control: str | None = None) -> tuple[str, ...]:
    """The options of every ssh call: no config file, no prompt, only our key, only our known_hosts; with
    `control`, through the master connection listening there (one handshake for a whole push)."""
    assert config.identity_file is not None and config.known_hosts is not None
    _user, _host, port, _folder = config.sftp_parts()
    shared = ("-o", f"ControlPath={control}", "-o", "ControlMaster=no") if control else ()
    return (*shared, "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={config.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-i", str(config.identity_file),
            "-o", f"ConnectTimeout={max(int(timeout), 1)}", "-o", "ServerAliveInterval=15",
            "-o", "ServerAliveCountMax=4", "-o", "LogLevel=ERROR", "-p", str(port))


def ssh_argv(config: RemoteConfig, command: str, *, timeout: float, control: str | None = None) -> tuple[str, ...]:
    """`ssh ... user@host -- COMMAND` (COMMAND is one string the host's shell reads)."""
    user, host, _port, _folder = config.sftp_parts()
    return ("ssh", *ssh_options(config, timeout=timeout, control=control), f"{user}@{host}", "--", command)


def master_argv(config: RemoteConfig, control: str, *, timeout: float) -> tuple[str, ...]:
    """The master connection: it serves the other calls through `control` and runs `read` on the host, so
    it ends when we close its stdin, or when we die (no ssh process outlives a killed push)."""
    user, host, _port, _folder = config.sftp_parts()
    return ("ssh", *ssh_options(config, timeout=timeout), "-M", "-o", f"ControlPath={control}",
            "-o", "ControlPersist=no", f"{user}@{host}", "--", "read _")


def rsync_argv(config: RemoteConfig, local: Path, remote_path: str, *, timeout: float,
               control: str | None = None) -> tuple[str, ...]:
    """`rsync` of one local file to `remote_path` on the host, through ssh_options."""
    user, host, _port, _folder = config.sftp_parts()
    shell = " ".join(shlex.quote(part) for part in ("ssh", *ssh_options(config, timeout=timeout, control=control)))
    return ("rsync", "--times", "--chmod=D750,F640", "--perms", "--mkpath", f"--timeout={max(int(timeout), 30)}",
            "--protect-args", "-e", shell, "--", str(local), f"{user}@{host}:{remote_path}")


class SshRemote:
    """A folder on an SSH host."""

    def __init__(self, config: RemoteConfig, *, timeout: float = 60.0) -> None:
        self.name = config.name
        self.config = config
        self.timeout = timeout
        user, host, port, self.folder = config.sftp_parts()
        self.where = f"{user}@{host}:{port}{self.folder}"
        self._group: execute.ProcessGroup | None = None
        self._master: execute.Child | None = None
        self._control_dir: str | None = None

    def _control(self) -> str | None:
        """The master connection's socket, started on first use; None when it could not start (then every
        call connects on its own and reports the real error)."""
        if self._control_dir is None:
            self._control_dir = tempfile.mkdtemp(prefix="kkua-ssh-")  # 0700: only we reach the socket
            control = os.path.join(self._control_dir, "master")
            self._group = execute.ProcessGroup(f"remote:{self.name}")
            try:
                self._master = self._group.spawn(master_argv(self.config, control, timeout=self.timeout),
                                                 stdin=execute.PIPE, stdout=execute.DEVNULL)
            except CommandFailed:
                return None
            deadline = time.monotonic() + self.timeout
            while not os.path.exists(control) and self._master.popen.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
        control = os.path.join(self._control_dir, "master")
        return control if os.path.exists(control) else None

    def close(self) -> None:
        """End the master connection (its stdin closes, `read` ends) and remove its socket's folder."""
        if self._master is not None and self._master.stdin is not None:
            with contextlib.suppress(OSError):
                self._master.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._master.popen.wait(timeout=10)
        if self._group is not None:
            self._group.__exit__(None, None, None)
        if self._control_dir is not None:
            shutil.rmtree(self._control_dir, ignore_errors=True)
        self._master = self._group = None

    def describe(self) -> str:
        return f"sftp://{self.where}"

    def path(self, key: str) -> str:
        return f"{self.folder}/{key}"

    def _error(self, exc: CommandFailed, action: str) -> RemoteError:
        tail = " | ".join(exc.stderr_tail[-3:]) or str(exc)
        if "Host key verification failed" in tail or "REMOTE HOST IDENTIFICATION HAS CHANGED" in tail:
            hint = (f"the host's key is not in {self.config.known_hosts}; check it out of band and add it "
                    "(ssh-keyscan -p PORT HOST, compared with the host's own fingerprint)")
        elif "Permission denied (publickey" in tail:
            hint = f"the host does not accept the key {self.config.identity_file} for this user"
        elif "No space left on device" in tail or "Disk quota exceeded" in tail:
            hint = "the remote's disk is full; free space there, then `kkua-backup push`"
        else:
            hint = "check that the host is reachable; the local set is kept"
        return RemoteError(f"remote {self.name} ({self.describe()}): cannot {action}: {tail}", hint=hint)

    def _run(self, command: str, action: str, *, timeout: float | None = None) -> str:
        try:
            out = execute.run(ssh_argv(self.config, command, timeout=self.timeout, control=self._control()),
                              job=f"remote:{self.name}",
                              timeout=timeout or self.timeout * 2, what=f"ssh to remote {self.name}")
        except CommandFailed as exc:
            raise self._error(exc, action) from None
        return out.decode("utf-8", "replace")

    def put(self, local: Path, key: str, *, size: int, sha256: str) -> PutResult:
        final = self.path(key)
        temp = final + TEMP_SUFFIX
        try:
            execute.run(rsync_argv(self.config, local, temp, timeout=self.timeout, control=self._control()),
                        job=f"remote:{self.name}",
                        timeout=UPLOAD_TIMEOUT, what=f"rsync to remote {self.name}")
        except CommandFailed as exc:
            free = self._free_bytes()
            if free is not None and free < size:
                raise RemoteError(f"remote {self.name} ({self.describe()}): cannot upload {key}: the remote's disk is "
                                  f"full ({free} bytes free, the file has {size})",
                                  hint="free space there, then `kkua-backup push`; the local set is kept") from None
            raise self._error(exc, f"upload {key}") from None
        # One connection checks the temporary file and renames it only when it is what we sent.
        q_temp, q_final = shlex.quote(temp), shlex.quote(final)
        found = self._run(f"set -e; s=$(stat -c %s -- {q_temp}); h=$(sha256sum < {q_temp}); h=${{h%% *}}; "
                          f"if [ \"$s $h\" = {shlex.quote(f'{size} {sha256}')} ]; then mv -f -- {q_temp} {q_final}; "
                          f"echo renamed; else rm -f -- {q_temp}; echo \"$s $h\"; fi",
                          f"check {key}", timeout=UPLOAD_TIMEOUT).strip()
        if found != "renamed":
            raise RemoteError(f"remote {self.name}: {key} arrived as {found[:80]!r}, not {size} bytes with sha256 "
                              f"{sha256[:12]}...", hint="the bytes were changed on the way; push again")
        return PutResult(key, size, "size+sha256")

    def _free_bytes(self) -> int | None:
        """Free bytes in the remote's folder (after a failed upload: was the disk full?); None if unknown."""
        try:
            out = self._run(f"df -P -k -- {shlex.quote(self.folder)} | tail -n 1", "look at the free space")
        except RemoteError:
            return None
        fields = out.split()
        return int(fields[3]) * 1024 if len(fields) >= 4 and fields[3].isdigit() else None

    def stat(self, key: str) -> RemoteObject | None:
        q = shlex.quote(self.path(key))
        out = self._run(f"if [ -f {q} ]; then stat -c %s -- {q}; fi", f"look at {key}").strip()
        return RemoteObject(key, int(out)) if out.isdigit() else None

    def sha256(self, key: str) -> str | None:
        q = shlex.quote(self.path(key))
        out = self._run(f"sha256sum < {q}", f"hash {key}", timeout=UPLOAD_TIMEOUT).split()
        return out[0] if out and _SHA_RE.match(out[0]) else None

    def list(self, folder: str) -> list[RemoteObject]:
        q = shlex.quote(self.path(folder.strip("/")))
        out = self._run(f"if [ -d {q} ]; then find {q} -mindepth 1 -maxdepth 1 -type f -printf '%s %f\\n'; fi",
                        f"list {folder}/")
        found = []
        for line in out.splitlines():
            size, _, name = line.partition(" ")
            if size.isdigit() and name and not name.endswith(TEMP_SUFFIX):
                found.append(RemoteObject(f"{folder.strip('/')}/{name}", int(size)))
        return sorted(found, key=lambda o: o.key)

    def read(self, key: str) -> Iterator[bytes]:
        argv = ssh_argv(self.config, f"cat -- {shlex.quote(self.path(key))}", timeout=self.timeout,
                        control=self._control())
        try:
            with execute.ProcessGroup(f"remote:{self.name}") as group:
                child = group.spawn(argv, timeout=UPLOAD_TIMEOUT)
                while data := child.read(1 << 20):
                    yield data
                group.wait(child, what=f"ssh to remote {self.name}")
        except CommandFailed as exc:
            raise self._error(exc, f"download {key}") from None

    def delete(self, key: str) -> None:
        try:
            execute.run(ssh_argv(self.config, f"rm -f -- {shlex.quote(self.path(key))}", timeout=self.timeout,
                                 control=self._control()),
                        job=f"remote:{self.name}", timeout=self.timeout * 2, what=f"ssh to remote {self.name}")
        except CommandFailed as exc:
            if any(word in line and "(publickey" not in line for line in exc.stderr_tail for word in _DENIED):
                raise DeleteRefused(f"remote {self.name} refused to delete {key}: {exc.stderr_tail[-1]}") from None
            raise self._error(exc, f"delete {key}") from None
