"""Talking to a Redis server for backups: connections, errors, the replication-protocol RDB capture, BGSAVE,
RDB headers and INFO parsing.

The RDB is captured the way `redis-cli --rdb` does it, on our own socket: `AUTH`, `REPLCONF capa eof`,
`REPLCONF rdb-only 1` (Redis 7+), `SYNC`; the server answers `$<length>` (a disk-based save) or
`$EOF:<40-byte mark>` (diskless, the Redis 7 default), possibly after keep-alive newlines while it saves.
That needs no access to the server's files, so it works from a sidecar container.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import NoPermissionError
from redis.retry import Retry

from kkua_backupd.config import RedisConfig
from kkua_backupd.errors import ConnectionFailed, JobError, KkuaError, StepTimeout

EOF_MARK_SIZE = 40
REPLICA_VERSION = "255.255.255"  # what we announce to Valkey: "send me your newest RDB format"
_RECV = 1 << 20
_LINE_MAX = 64 * 1024
_NOPERM_COMMAND = re.compile(r"run the '([^']+)' command", re.IGNORECASE)
_VERSION = re.compile(r"^(\d+)\.(\d+)")

# (major, minor) of the first Redis release writing each RDB version, newest first (from redis/librdb's
# redisver.h): 8.6 writes 13; 7.4 to 8.4 write 12; 7.2 writes 11; 7.0 writes 10; 5.0 to 6.2 write 9.
_RDB_BY_RELEASE: tuple[tuple[tuple[int, int], int], ...] = (
    ((8, 6), 13), ((7, 4), 12), ((7, 2), 11), ((7, 0), 10), ((5, 0), 9), ((4, 0), 8), ((3, 2), 7),
    ((2, 6), 6), ((2, 4), 5),
)


def where(cfg: RedisConfig) -> str:
    """`Redis at host:port`, the way every message names the server."""
    return f"Redis at {cfg.host}:{cfg.port}"


# ----------------------------------------------------------------------------------------------
# Connections and errors


def connect(cfg: RedisConfig, *, db: int = 0, timeout: float | None = None) -> redis.Redis:
    """A redis-py client for the configured server (user and password from the config). It connects on its
    first command, whose redis-py errors the caller turns into one-line errors with `connection_error`
    (so a caller may also wait through them, e.g. while a server starts or loads)."""
    password = cfg.password.get_secret_value() if cfg.password is not None else None
    return redis.Redis(host=cfg.host, port=cfg.port, db=db, username=cfg.username, password=password,
                       socket_connect_timeout=cfg.connect_timeout,
                       socket_timeout=timeout if timeout is not None else max(cfg.connect_timeout, 30),
                       # one quick retry: redis-py's default (3, backing off up to 10 s) makes a server that
                       # is down take seconds to report, and the daemon retries whole jobs anyway
                       retry=Retry(ExponentialWithJitterBackoff(base=0.1, cap=1), 1))


def connect_checked(cfg: RedisConfig, *, db: int = 0, timeout: float | None = None) -> redis.Redis:
    """`connect`, then PING; raises ConnectionFailed (or JobError for an ACL refusal) in one actionable line."""
    client = connect(cfg, db=db, timeout=timeout)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        raise connection_error(cfg, exc) from None
    return client


def _user(cfg: RedisConfig) -> str:
    return f"user {cfg.username!r}" if cfg.username else "the default user"


def connection_error(cfg: RedisConfig, exc: BaseException) -> KkuaError:
    """Translate a redis-py or socket failure into one line saying what failed and what to do."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    server = where(cfg)
    lowered = text.lower()
    if isinstance(exc, NoPermissionError) or lowered.startswith("noperm"):
        match = _NOPERM_COMMAND.search(text)
        command = match.group(1).upper() if match else "a command it needs"
        return JobError(f"{server}: {_user(cfg)} may not run {command} (ACL: {text})",
                        hint=f"allow it, e.g. ACL SETUSER {cfg.username or 'default'} +{command.lower()}")
    if "without any password configured" in lowered or "no password is set" in lowered:
        return ConnectionFailed(f"{server} has no password, but one is configured ({text})",
                                hint="remove redis.password_file / REDIS_PASSWORD, or set requirepass on the server")
    if isinstance(exc, redis.AuthenticationError) or lowered.startswith(("wrongpass", "noauth")) \
            or "invalid password" in lowered or "username-password" in lowered:
        if cfg.password is None or "authentication required" in lowered:
            return ConnectionFailed(f"{server} needs a password and none is configured",
                                    hint="set redis.password_file or REDIS_PASSWORD")
        return ConnectionFailed(f"{server} refused the password of {_user(cfg)}: {text}",
                                hint="check redis.password_file or REDIS_PASSWORD (and redis.username)")
    if isinstance(exc, redis.BusyLoadingError) or lowered.startswith("loading"):
        return ConnectionFailed(f"{server} is loading its dataset into memory",
                                hint="try again when it has finished loading")
    if isinstance(exc, (redis.TimeoutError, TimeoutError)):
        return ConnectionFailed(f"{server} did not answer in time ({text})",
                                hint="is it overloaded or behind a firewall? raise redis.connect_timeout if needed")
    if isinstance(exc, (redis.ConnectionError, OSError)):
        text = re.sub(r"^Error \d+ connecting to \S+?:\d+\.\s*", "", text).rstrip(".")
        return ConnectionFailed(f"cannot reach {server}: {text}",
                                hint="is redis-server running? check redis.host and redis.port (REDIS_HOST, "
                                     "REDIS_PORT)")
    return JobError(f"{server} answered with an error: {text}")


# ----------------------------------------------------------------------------------------------
# RDB versions


def parse_server_version(version: str) -> tuple[int, int]:
    """(major, minor) of a `redis_version` string such as "7.2.4"; raises ValueError otherwise."""
    match = _VERSION.match(version.strip())
    if not match:
        raise ValueError(f"not a Redis version: {version!r}")
    return int(match.group(1)), int(match.group(2))


def max_rdb_version(server_version: str) -> int:
    """The newest RDB version a Redis server of this version can load (Redis 5/6: 9, 7.0: 10, 7.2: 11,
    7.4 to 8.4: 12, 8.6: 13); raises ValueError for a string that is not a version."""
    release = parse_server_version(server_version)
    for first, rdb in _RDB_BY_RELEASE:
        if release >= first:
            return rdb
    return 5


# ----------------------------------------------------------------------------------------------
# INFO


def keyspace(info: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """Per-database counts from redis-py's parsed `INFO keyspace` (or `INFO all`):
    {"0": {"keys": n, "expires": m}, ...}, numeric order."""
    found: dict[int, dict[str, int]] = {}
    for name, value in info.items():
        if re.fullmatch(r"db\d+", str(name)) and isinstance(value, Mapping):
            found[int(str(name)[2:])] = {"keys": int(value.get("keys", 0)), "expires": int(value.get("expires", 0))}
    return {str(db): found[db] for db in sorted(found)}


def key_counts(info: Mapping[str, Any]) -> dict[str, int]:
    """{"0": keys, "3": keys, ...} from a parsed INFO (databases without keys are not listed)."""
    return {db: counts["keys"] for db, counts in keyspace(info).items()}


def plain_info(info: Mapping[str, Any]) -> dict[str, Any]:
    """A parsed INFO section as JSON-ready typed values (redis-py already types numbers)."""
    out: dict[str, Any] = {}
    for key, value in info.items():
        if isinstance(value, Mapping):
            out[str(key)] = plain_info(value)
        elif isinstance(value, bool | int | float) or value is None:
            out[str(key)] = value
        else:
            out[str(key)] = str(value)
    return out


# ----------------------------------------------------------------------------------------------
# The replication-protocol capture


class SyncRefused(JobError):
    """The server does not let us SYNC (ACL NOPERM, or a managed service without the command)."""


@dataclass(frozen=True)
class SyncResult:
    """What a SYNC capture received: the transfer form ("len" or "eof"), RDB bytes and seconds."""

    form: str
    size: int
    seconds: float
    waited_seconds: float  # until the server started sending (its save, or the diskless delay)


def command(*args: str | bytes) -> bytes:
    """One RESP array (binary-safe, so a password with spaces or quotes goes through untouched)."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Reader:
    """Buffered reads from the replication socket, every one bounded by the capture's deadline."""

    def __init__(self, sock: socket.socket, deadline: float, timeout: float, server: str) -> None:
        self.sock = sock
        self.deadline = deadline
        self.timeout = timeout
        self.server = server
        self.buffer = bytearray()

    def _recv(self, size: int) -> bytes:
        data: bytes = self._guarded(self.sock.recv, size)
        return data

    def into(self, view: memoryview) -> int:
        """Fill the start of `view` (the buffer first, then one receive); 0 when the server closed the
        connection. The socket's bytes land in the caller's buffer: no object per receive."""
        if self.buffer:
            got = min(len(view), len(self.buffer))
            view[:got] = self.buffer[:got]
            del self.buffer[:got]
            return got
        received: int = self._guarded(self.sock.recv_into, view)
        return received

    def _guarded(self, receive: Callable[[Any], Any], arg: Any) -> Any:
        """`receive(arg)` bounded by the deadline, its errors said as the capture's."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise self._timed_out()
        self.sock.settimeout(remaining)
        try:
            return receive(arg)
        except TimeoutError:
            raise self._timed_out() from None
        except OSError as exc:
            raise ConnectionFailed(f"{self.server}: the connection failed during the capture: {exc.strerror or exc}",
                                   hint="check the server's log; run the backup again") from None

    def _timed_out(self) -> StepTimeout:
        return StepTimeout(f"RDB capture from {self.server} timed out after {self.timeout:.0f} s and was stopped",
                           hint="raise redis.capture_timeout, or find what slows the server's save")

    def line(self) -> bytes:
        """The next line without its line ending (b"" for a keep-alive newline); raises on a closed socket."""
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                raw = bytes(self.buffer[:end])
                del self.buffer[: end + 1]
                return raw.rstrip(b"\r")
            if len(self.buffer) > _LINE_MAX:
                raise JobError(f"{self.server} sent an unexpected reply (no line end in {_LINE_MAX} bytes)")
            data = self._recv(4096)
            if not data:
                raise ConnectionFailed(f"{self.server} closed the connection before sending the RDB",
                                       hint="check the server's log (it may have refused the replica)")
            self.buffer += data

    def chunk(self, limit: int) -> bytes:
        """Up to `limit` bytes (the buffer first); b"" when the server closed the connection."""
        if self.buffer:
            data = bytes(self.buffer[:limit])
            del self.buffer[:limit]
            return data
        return self._recv(min(limit, _RECV))


def _reply(reader: _Reader) -> bytes:
    """The next non-empty reply line (keep-alive newlines skipped)."""
    while True:
        line = reader.line()
        if line:
            return line


def _refusal(server: str, command: str, error: str) -> SyncRefused | None:
    """SyncRefused when `error` means the server will never let us replicate (ACL, disabled command)."""
    lowered = error.lower()
    if lowered.startswith("-noperm") or "unknown command" in lowered or "no permissions" in lowered:
        return SyncRefused(f"{server} refused {command}: {error[1:].strip()}")
    return None


def sync_rdb(cfg: RedisConfig, sink: Callable[[bytes], None], *, on_start: Callable[[str], None] | None = None,
             log: Any = None) -> SyncResult:
    """Capture the server's RDB over the replication protocol, passing its bytes to `sink` in chunks.

    `on_start(form)` is called once the server starts sending (form "len" or "eof"). Raises SyncRefused
    when SYNC is not allowed, ConnectionFailed/JobError (see connection_error) for other refusals,
    StepTimeout past redis.capture_timeout, JobError when the stream ends early.
    """
    server = where(cfg)
    started = time.monotonic()
    deadline = started + cfg.capture_timeout
    try:
        sock = socket.create_connection((cfg.host, cfg.port), timeout=cfg.connect_timeout)
    except OSError as exc:
        raise connection_error(cfg, exc) from None
    with contextlib.closing(sock):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        reader = _Reader(sock, deadline, cfg.capture_timeout, server)

        def ask(*args: str | bytes) -> bytes:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                sock.sendall(command(*args))
            except OSError as exc:
                raise connection_error(cfg, exc) from None
            return _reply(reader)

        if cfg.password is not None:
            auth: tuple[str, ...] = ("AUTH", cfg.username) if cfg.username else ("AUTH",)
            answer = ask(*auth, cfg.password.get_secret_value())
            if answer.startswith(b"-"):
                text = answer[1:].decode("utf-8", "replace")
                raise connection_error(cfg, redis.AuthenticationError(text))
        def replconf(*args: str) -> str | None:
            """The error text of `REPLCONF ARGS`, None when it succeeded; raises when an ACL refused it."""
            answer = ask("REPLCONF", *args)
            if not answer.startswith(b"-"):
                return None
            text = answer.decode("utf-8", "replace")
            refused = _refusal(server, "REPLCONF", text)
            if refused is not None:
                raise refused
            return text

        error = replconf("capa", "eof")
        if error is not None:
            if error.startswith("-NOAUTH"):
                raise connection_error(cfg, redis.AuthenticationError("Authentication required."))
            raise JobError(f"{server} refused REPLCONF capa eof: {error[1:]}")
        error = replconf("rdb-only", "1")
        # Redis < 7 does not know rdb-only: it then streams commands after the RDB, which we never read.
        if error is not None and log is not None:
            log.debug("server does not support REPLCONF rdb-only (Redis < 7); going on", reply=error)
        # Valkey 9 sends a replica that does not say its version an RDB 11 stream, and fails the transfer
        # when the data needs its own newer format (hash-field TTLs): say we read the newest. Redis does not
        # know the option and answers an error, which changes nothing.
        error = replconf("version", REPLICA_VERSION)
        if error is not None and log is not None:
            log.debug("server does not take REPLCONF version (not Valkey 9+); going on", reply=error)
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        sock.sendall(b"SYNC\r\n")
        header = _reply(reader)  # keep-alive newlines while the server saves are skipped here
        if header.startswith(b"-"):
            text = header.decode("utf-8", "replace")
            refused = _refusal(server, "SYNC", text)
            if refused is not None:
                raise refused
            raise JobError(f"{server} refused SYNC: {text[1:]}",
                           hint="see the server's log; a replica that lost its master cannot serve SYNC")
        if not header.startswith(b"$"):
            raise JobError(f"{server} answered SYNC with {header[:60]!r} instead of an RDB transfer")
        waited = time.monotonic() - started
        if header.startswith(b"$EOF:"):
            mark = header[5:]
            if len(mark) != EOF_MARK_SIZE:
                raise JobError(f"{server} sent a malformed diskless transfer header {header[:60]!r}")
            if on_start is not None:
                on_start("eof")
            size = _until_mark(reader, mark, sink, server)
            form = "eof"
        else:
            try:
                length = int(header[1:])
            except ValueError:
                raise JobError(f"{server} sent a malformed RDB length {header[:60]!r}") from None
            if on_start is not None:
                on_start("len")
            size = _exactly(reader, length, sink, server)
            form = "len"
    return SyncResult(form, size, time.monotonic() - started, waited)


def _exactly(reader: _Reader, length: int, sink: Callable[[bytes], None], server: str) -> int:
    remaining = length
    while remaining:
        data = reader.chunk(min(remaining, _RECV))
        if not data:
            raise JobError(f"{server} closed the connection after {length - remaining} of {length} RDB bytes",
                           hint="the capture is incomplete and was discarded; check the server's log and retry")
        sink(data)
        remaining -= len(data)
    return length


def _until_mark(reader: _Reader, mark: bytes, sink: Callable[[bytes], None], server: str) -> int:
    """Pass bytes on until the 40-byte end mark (which is not part of the RDB); returns the RDB size.

    The socket is read into one buffer whose first bytes are those held back from the last read (they may
    be the start of the mark), so each read costs one copy out of the kernel and one into the `bytes` the
    sink gets, whatever the chunk size."""
    buf = bytearray(EOF_MARK_SIZE - 1 + _RECV)
    view = memoryview(buf)
    held = 0  # bytes at the start of buf kept back in case they are the start of the mark
    size = 0
    with view:
        while True:
            got = reader.into(view[held:])
            if not got:
                raise JobError(f"{server} closed the connection after {size + held} bytes, before the end "
                               "of the diskless RDB transfer",
                               hint="the capture is incomplete and was discarded; check the server's log and retry")
            end = held + got
            at = buf.find(mark, 0, end)
            if at >= 0:
                if at:
                    sink(bytes(view[:at]))
                return size + at
            keep = min(end, EOF_MARK_SIZE - 1)
            if end > keep:
                sink(bytes(view[: end - keep]))
                size += end - keep
                buf[:keep] = buf[end - keep:end]  # (the right side is a copy: safe where the two overlap)
            held = keep


# ----------------------------------------------------------------------------------------------
# BGSAVE, when SYNC is not allowed


@dataclass(frozen=True)
class BgsaveResult:
    """A finished BGSAVE: when the server recorded it, and how long we waited."""

    lastsave: int
    seconds: float


def _persistence(client: redis.Redis) -> dict[str, Any]:
    info: dict[str, Any] = client.info("persistence")
    return info


def bgsave(client: redis.Redis, cfg: RedisConfig, *, log: Any = None, poll: float = 0.1) -> BgsaveResult:
    """Ask the server for a fresh RDB and wait until it is on its disk: LASTSAVE recorded first, BGSAVE
    (waiting out a save already running, scheduling behind an AOF rewrite), then INFO persistence polled
    until no save runs and LASTSAVE moved on; raises JobError if the save failed, StepTimeout past
    redis.bgsave_timeout."""
    server = where(cfg)
    started = time.monotonic()
    deadline = started + cfg.bgsave_timeout

    def timed_out(what: str) -> StepTimeout:
        return StepTimeout(f"BGSAVE on {server}: {what} within redis.bgsave_timeout ({cfg.bgsave_timeout} s)",
                           hint="raise redis.bgsave_timeout, or see the server's log for why saving is slow")

    try:
        while True:
            before = int(_persistence(client)["rdb_last_save_time"])
            # LASTSAVE has a resolution of one second: a save ending in the second of the previous one
            # would look like no save at all, so start ours only once the server's clock is past it.
            while int(client.time()[0]) <= before:
                if time.monotonic() > deadline:
                    raise timed_out("the server clock did not move past the last save")
                time.sleep(poll)
            try:
                answer = client.execute_command("BGSAVE", "SCHEDULE")  # type: ignore[no-untyped-call]
                reply = answer.decode() if isinstance(answer, bytes) else str(answer)
                if log is not None:
                    log.info("BGSAVE requested", reply=reply)
                # "started" now, or "scheduled" behind an AOF rewrite (then it starts later by itself)
                ran = "started" in reply
                break
            except redis.ResponseError as exc:
                if "already in progress" not in str(exc):
                    raise
                # Someone else's save started before we asked: wait for it, then take our own.
                if log is not None:
                    log.info("a BGSAVE is already running on the server; waiting for it before ours")
                while int(_persistence(client).get("rdb_bgsave_in_progress", 0)):
                    if time.monotonic() > deadline:
                        raise timed_out("the save already running did not finish") from None
                    time.sleep(poll)
        while True:
            info = _persistence(client)
            if int(info.get("rdb_bgsave_in_progress", 0)):
                ran = True
            elif int(info["rdb_last_save_time"]) != before:
                break
            elif ran and str(info.get("rdb_last_bgsave_status", "ok")) != "ok":
                break  # ours ran and failed (a failed save leaves LASTSAVE as it was)
            if time.monotonic() > deadline:
                raise timed_out("the save did not finish")
            time.sleep(poll)
    except redis.RedisError as exc:
        raise connection_error(cfg, exc) from None
    status = str(info.get("rdb_last_bgsave_status", "ok"))
    if status != "ok":
        raise JobError(f"BGSAVE on {server} failed (rdb_last_bgsave_status:{status})",
                       hint="see the server's log: disk full, or no write permission in its dir?")
    return BgsaveResult(int(info["rdb_last_save_time"]), time.monotonic() - started)


def server_rdb_path(client: redis.Redis, cfg: RedisConfig) -> Path:
    """Where the server keeps its RDB as seen from here: redis.data_dir (a sidecar's mount) or CONFIG GET
    dir, joined with CONFIG GET dbfilename (dump.rdb when CONFIG is refused and data_dir is set); raises
    JobError when CONFIG is refused and no data_dir is set."""
    conf: dict[Any, Any] = {}
    try:
        conf.update(client.config_get("dbfilename"))
        if cfg.data_dir is None:
            conf.update(client.config_get("dir"))
    except redis.RedisError as exc:
        if cfg.data_dir is None:
            raise JobError(f"cannot find the server's RDB file: {connection_error(cfg, exc).message}",
                           hint="set redis.data_dir to the server's data folder as mounted here") from None
    folder = cfg.data_dir if cfg.data_dir is not None else Path(str(conf["dir"]))
    return folder / str(conf.get("dbfilename") or "dump.rdb")


def lastsave_time(value: int) -> str:
    """A LASTSAVE value as ISO 8601 (UTC) for logs and manifests."""
    return dt.datetime.fromtimestamp(value, tz=dt.UTC).isoformat()
