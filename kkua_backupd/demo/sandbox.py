"""Throwaway PostgreSQL servers for the demo, the integration tests and the benchmarks.

Everything here runs real ``initdb``/``pg_ctl``/``postgres`` binaries from the
Debian packages (``/usr/lib/postgresql/<N>/bin``); nothing is mocked.  A server
lives in its own temporary directory (data directory, Unix socket directory and
server log) and listens on 127.0.0.1 on a free port.  Durability is switched off
(``fsync=off``) because the servers are disposable.

When the current process runs as root, PostgreSQL's binaries are run as the
``postgres`` OS user through ``runuser`` (the server refuses to run as root);
otherwise they run as the current user.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psycopg
from psycopg import sql

from kkua_backupd.sources.redis.local import free_port

__all__ = [
    "ThrowawayPostgres",
    "create_sample_data",
    "find_pg_bin_dir",
    "free_port",
]

PG_LIB_DIR = Path("/usr/lib/postgresql")
_SERVER_OS_USER = "postgres"
_READY_TIMEOUT_S = 30.0
_POLL_INTERVAL_S = 0.05
_CMD_TIMEOUT_S = 120.0
_LOG_TAIL_LINES = 20
_START_ATTEMPTS = 5
_BIND_ERROR = re.compile(r"could not (bind|create listen socket)|Address already in use", re.IGNORECASE)


def find_pg_bin_dir(major: int | None = None) -> Path:
    """Return the newest ``/usr/lib/postgresql/<N>/bin`` holding ``initdb``, or the one for ``major``.

    Raises FileNotFoundError if no matching PostgreSQL server installation exists.
    """
    candidates: list[tuple[int, Path]] = []
    if PG_LIB_DIR.is_dir():
        for entry in PG_LIB_DIR.iterdir():
            if not entry.name.isdigit():
                continue
            bin_dir = entry / "bin"
            if (bin_dir / "initdb").is_file():
                candidates.append((int(entry.name), bin_dir))
    if major is not None:
        for version, bin_dir in candidates:
            if version == major:
                return bin_dir
        raise FileNotFoundError(f"no PostgreSQL {major} server binaries under {PG_LIB_DIR}/{major}/bin")
    if not candidates:
        raise FileNotFoundError(f"no PostgreSQL server binaries (initdb) under {PG_LIB_DIR}/<N>/bin")
    return max(candidates)[1]


def _pid_alive(pid: int) -> bool:
    """Return True if process ``pid`` exists and is not a zombie (PID 1 here may not reap orphans)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    # Format: "pid (comm) state ..."; comm may contain spaces/parentheses.
    state = stat[stat.rfind(")") + 2 :].split(" ", 1)[0]
    return state not in ("Z", "X")


def _remove_sysv_shm(shmid: int) -> None:
    """Mark SysV shared memory segment ``shmid`` for removal (IPC_RMID) if nobody is attached; never raises."""
    try:
        # struct shmid_ds on 64-bit Linux: ipc_perm (48 bytes), size_t shm_segsz, time_t atime/dtime/ctime,
        # pid_t cpid/lpid, shmatt_t (unsigned long) shm_nattch, ...
        buf = ctypes.create_string_buffer(256)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.shmctl(ctypes.c_int(shmid), ctypes.c_int(2), buf) != 0:  # IPC_STAT
            return
        nattch = ctypes.c_ulong.from_buffer(buf, 48 + 8 + 3 * 8 + 2 * 4).value
        if ctypes.sizeof(ctypes.c_void_p) == 8 and nattch == 0:
            libc.shmctl(ctypes.c_int(shmid), ctypes.c_int(0), None)  # IPC_RMID
    except (OSError, AttributeError, ValueError):
        pass


def _child_pids(pid: int) -> list[int]:
    """Return the PIDs whose parent is ``pid`` (read from /proc; empty if unavailable)."""
    children: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return children
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split(" ")
        if len(fields) > 1 and fields[1] == str(pid):
            children.append(int(entry))
    return children


class ThrowawayPostgres:
    """A disposable PostgreSQL server in a temporary directory, listening on 127.0.0.1:<free port>.

    Use it as a context manager (``with ThrowawayPostgres() as pg: ...``) or call
    ``start()`` and ``destroy()`` yourself.
    """

    host: str = "127.0.0.1"
    user: str = "postgres"

    def __init__(self, base_dir: Path | None = None, password: str = "sandbox-secret",
                 bin_dir: Path | None = None) -> None:
        """Prepare (but do not start) a server whose temp dir goes under ``base_dir`` (default: /tmp).

        ``bin_dir`` is the folder holding ``initdb``, ``pg_ctl``, ``postgres`` and ``pg_dump`` of the
        server to run (default: the newest Debian installation); as root it must be readable and
        executable by the ``postgres`` OS user. Raises FileNotFoundError if it holds no ``initdb``, or
        (without ``bin_dir``) if no PostgreSQL server binaries are installed.
        """
        self.base_dir: Path | None = Path(base_dir) if base_dir is not None else None
        self.password: str = password
        self.port: int = 0
        if bin_dir is not None and not (Path(bin_dir) / "initdb").is_file():
            raise FileNotFoundError(f"no PostgreSQL server binaries (initdb) in {bin_dir}")
        self.bin_dir: Path = Path(bin_dir) if bin_dir is not None else find_pg_bin_dir()
        self._root: Path | None = None
        self._initialized = False
        self._atexit_registered = False

    # ------------------------------------------------------------------ paths
    @property
    def tmp_dir(self) -> Path:
        """The temporary directory holding everything; raises RuntimeError before ``start()``."""
        if self._root is None:
            raise RuntimeError("ThrowawayPostgres has not been started")
        return self._root

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory; raises RuntimeError before ``start()``."""
        return self.tmp_dir / "data"

    @property
    def socket_dir(self) -> Path:
        """The Unix-socket directory (``-k``); raises RuntimeError before ``start()``."""
        return self.tmp_dir / "socket"

    @property
    def log_file(self) -> Path:
        """The server log written by ``pg_ctl -l``; raises RuntimeError before ``start()``."""
        return self.tmp_dir / "server.log"

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Create the temp dir, run initdb and start the server, then wait until it accepts connections.

        Raises RuntimeError (with the last lines of the server log or the tool's output) if any step
        fails; the temp dir is kept for inspection and ``destroy()`` can still be called.
        """
        if self._root is not None and self.is_running():
            raise RuntimeError(f"server already running on port {self.port}")
        if self._root is None or not self._root.exists():  # first start, or start again after destroy()
            parent = str(self.base_dir) if self.base_dir is not None else "/tmp"
            self._root = Path(tempfile.mkdtemp(prefix="kkua-pg-", dir=parent))
            if not self._atexit_registered:
                atexit.register(self._atexit_destroy)
                self._atexit_registered = True
            self.socket_dir.mkdir(mode=0o700)
            if os.geteuid() == 0:
                self._chown_to_server_user(self.tmp_dir)
                self._chown_to_server_user(self.socket_dir)
        if not self._initialized:
            self._initdb()
            self._initialized = True
        self._start_server(choose_new_port=True)

    def stop(self) -> None:
        """Stop the server with ``pg_ctl stop -m fast -w`` if it is running; no-op otherwise.

        Raises RuntimeError if pg_ctl fails and the server is still running afterwards.
        """
        if self._root is None or not self.is_running():
            return
        result = self._run_pg([self._bin("pg_ctl"), "stop", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "30"])
        if result.returncode != 0 and self.is_running():
            raise RuntimeError(
                f"pg_ctl stop failed (exit {result.returncode}): {result.stdout}{result.stderr}\n{self._log_tail()}"
            )

    def destroy(self) -> None:
        """Stop the server (SIGKILL as a last resort) and remove the temp dir; safe to call repeatedly.

        Raises OSError only if the temp dir cannot be removed.
        """
        if self._root is None:
            return
        try:
            self.stop()
        except RuntimeError:
            self.kill9()
        if self._root.exists():
            shutil.rmtree(self._root)
        self._initialized = False
        if self._atexit_registered:
            atexit.unregister(self._atexit_destroy)
            self._atexit_registered = False

    def restart(self) -> None:
        """Stop the server if running (or after ``kill9()``) and start it again on the same port.

        Raises RuntimeError if the server was never initialised or does not come back up.
        """
        if self._root is None or not self._initialized:
            raise RuntimeError("ThrowawayPostgres has not been started")
        self.stop()
        self._start_server(choose_new_port=False)

    def is_running(self) -> bool:
        """Return True if the postmaster named in ``postmaster.pid`` is alive; never raises."""
        pid = self._postmaster_pid()
        return pid is not None and _pid_alive(pid)

    def kill9(self) -> None:
        """SIGKILL the postmaster (simulating a crash) and wait for its children to exit; no-op if not running.

        Because the sandbox runs with synchronous_commit=off, commits from the last few hundred ms may be
        lost (use ``SET synchronous_commit = on`` or ``CHECKPOINT`` first if they must survive).
        """
        pid = self._postmaster_pid()
        if pid is None or not _pid_alive(pid):
            return
        children = _child_pids(pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        # Backends notice postmaster death on their own; wait for them so that a restart does not
        # trip over a still-attached shared memory segment.
        deadline = time.monotonic() + 10.0
        waiting = [pid, *children]
        while waiting and time.monotonic() < deadline:
            waiting = [p for p in waiting if _pid_alive(p)]
            if waiting:
                time.sleep(_POLL_INTERVAL_S)
        for p in waiting:  # stragglers: be blunt, it is throwaway
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        self._clear_stale_locks(pid)

    def _clear_stale_locks(self, pid: int) -> None:
        """Make a restart possible after the postmaster ``pid`` died without cleaning up.

        PostgreSQL treats its lock files as live while kill(pid, 0) succeeds, which is still true for
        a zombie; in containers whose PID 1 reaps orphans late (or never), the dead postmaster stays a
        zombie for a while.  Wait up to 3 s for it to vanish (then PostgreSQL cleans up itself), else
        remove the lock files and the SysV shared memory header segment ourselves.
        """
        deadline = time.monotonic() + 3.0
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(_POLL_INTERVAL_S)
        if not Path(f"/proc/{pid}").exists() or _pid_alive(pid):
            return
        lock = self.data_dir / "postmaster.pid"
        try:
            lines = lock.read_text(encoding="ascii", errors="replace").splitlines()
        except OSError:
            lines = []
        if len(lines) >= 7:  # line 7: "<shm key> <shm id>" of the (small) SysV segment
            parts = lines[6].split()
            if len(parts) == 2 and parts[1].isdigit():
                _remove_sysv_shm(int(parts[1]))
        lock.unlink(missing_ok=True)
        for name in (f".s.PGSQL.{self.port}.lock", f".s.PGSQL.{self.port}"):
            (self.socket_dir / name).unlink(missing_ok=True)

    def __enter__(self) -> Self:
        """Start the server, destroying everything if start fails; raises what ``start()`` raises."""
        try:
            self.start()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Destroy the server and its temp dir."""
        self.destroy()

    # ---------------------------------------------------------- connections
    def conninfo(self, dbname: str = "postgres") -> dict[str, Any]:
        """Return psycopg/libpq keyword arguments (host, port, user, password, dbname) for a TCP connection."""
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "dbname": dbname,
        }

    def connect(self, dbname: str = "postgres", autocommit: bool = True) -> psycopg.Connection[Any]:
        """Open a password-authenticated TCP connection; raises psycopg.OperationalError if it fails."""
        return psycopg.connect(**self.conninfo(dbname), autocommit=autocommit, connect_timeout=5)

    def create_database(self, name: str) -> None:
        """Create database ``name`` (owned by postgres); raises psycopg.Error if it already exists."""
        with self.connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def drop_database(self, name: str) -> None:
        """Terminate other sessions on ``name`` and drop it if it exists; raises psycopg.Error on failure."""
        with self.connect() as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    # ------------------------------------------------------------- helpers
    def __repr__(self) -> str:
        return f"<ThrowawayPostgres {self.host}:{self.port} dir={self._root}>"

    def _atexit_destroy(self) -> None:
        """Best-effort cleanup at interpreter exit for servers that were never destroyed."""
        with contextlib.suppress(Exception):  # nothing sensible to do at interpreter exit
            self.destroy()

    def _bin(self, name: str) -> str:
        return str(self.bin_dir / name)

    @staticmethod
    def _chown_to_server_user(path: Path) -> None:
        pw = pwd.getpwnam(_SERVER_OS_USER)
        os.chown(path, pw.pw_uid, pw.pw_gid)

    def _run_pg(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL tool (as the postgres OS user when root), capturing its output."""
        cmd = list(argv)
        if os.geteuid() == 0:
            runuser = shutil.which("runuser") or "/usr/sbin/runuser"
            cmd = [runuser, "-u", _SERVER_OS_USER, "--", *cmd]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C.UTF-8"
        try:
            return subprocess.run(
                cmd,
                cwd=str(self.tmp_dir),  # the postgres user may not be able to enter our cwd
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=_CMD_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"{cmd[0]} timed out after {_CMD_TIMEOUT_S:.0f}s: {cmd}") from e
        except OSError as e:
            raise RuntimeError(f"cannot run {cmd[0]}: {e}") from e

    def _initdb(self) -> None:
        """Run initdb (C.UTF-8 locale, falling back to --no-locale); raises RuntimeError on failure."""
        pwfile = self.tmp_dir / "pwfile"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.password + "\n")
            if os.geteuid() == 0:
                self._chown_to_server_user(pwfile)
            base = [
                self._bin("initdb"),
                "-D",
                str(self.data_dir),
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                f"--username={self.user}",
                f"--pwfile={pwfile}",
                "--encoding=UTF8",
            ]
            result = self._run_pg([*base, "--locale=C.UTF-8"])
            if result.returncode != 0:
                first_error = result.stdout + result.stderr
                shutil.rmtree(self.data_dir, ignore_errors=True)
                result = self._run_pg([*base, "--no-locale"])
                if result.returncode != 0:
                    hint = ""
                    if os.geteuid() == 0:
                        hint = (
                            f"\n(hint: initdb runs as the {_SERVER_OS_USER!r} OS user, which must be able to"
                            f" traverse every parent directory of {self.tmp_dir})"
                        )
                    raise RuntimeError(
                        f"initdb failed (exit {result.returncode}) with --locale=C.UTF-8:\n{first_error}\n"
                        f"and with --no-locale:\n{result.stdout}{result.stderr}{hint}"
                    )
        finally:
            pwfile.unlink(missing_ok=True)

    def _start_server(self, choose_new_port: bool) -> None:
        """Start the postmaster and wait for a password login to succeed; raises RuntimeError on failure.

        On a bind failure a new free port is tried (only if ``choose_new_port``), up to a few times.
        """
        last_error = ""
        for _attempt in range(_START_ATTEMPTS):
            if choose_new_port or self.port == 0:
                self.port = free_port()
            options = (
                f"-c listen_addresses={self.host} -p {self.port} -k {self.socket_dir}"
                " -c fsync=off -c full_page_writes=off -c synchronous_commit=off"
                " -c max_connections=50 -c shared_buffers=128MB"
            )
            log_size_before = self.log_file.stat().st_size if self.log_file.exists() else 0
            result = self._run_pg(
                [
                    self._bin("pg_ctl"),
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.log_file),
                    "-o",
                    options,
                    "-w",
                    "-t",
                    "30",
                    "start",
                ]
            )
            if result.returncode == 0:
                self._wait_ready()
                return
            new_log = self._read_log()[log_size_before:]
            last_error = f"pg_ctl start failed (exit {result.returncode}): {result.stdout}{result.stderr}"
            if self.is_running():  # e.g. pg_ctl timed out but the server is limping along
                self.kill9()
            if not (choose_new_port and _BIND_ERROR.search(new_log)):
                break
        raise RuntimeError(f"{last_error}\n{self._log_tail()}")

    def _wait_ready(self) -> None:
        """Poll a psycopg connection every 0.05 s for up to 30 s; raises RuntimeError on timeout."""
        deadline = time.monotonic() + _READY_TIMEOUT_S
        last_exc: Exception | None = None
        while True:
            try:
                with psycopg.connect(**self.conninfo(), autocommit=True, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.Error as e:
                last_exc = e
            if time.monotonic() >= deadline:
                break
            time.sleep(_POLL_INTERVAL_S)
        if self.is_running():
            self.kill9()
        raise RuntimeError(
            f"PostgreSQL on {self.host}:{self.port} not ready after {_READY_TIMEOUT_S:.0f}s: {last_exc}\n"
            f"{self._log_tail()}"
        )

    def _postmaster_pid(self) -> int | None:
        if self._root is None:
            return None
        try:
            first = (self.data_dir / "postmaster.pid").read_text(encoding="ascii", errors="replace").split("\n", 1)[0]
            return int(first.strip())
        except (OSError, ValueError):
            return None

    def _read_log(self) -> str:
        try:
            return self.log_file.read_text(encoding="utf-8", errors="replace")
        except (OSError, RuntimeError):
            return ""

    def _log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        tail = self._read_log().splitlines()[-lines:]
        if not tail:
            return "(server log is empty or missing)"
        return f"last {len(tail)} lines of {self.log_file}:\n" + "\n".join(tail)


# --------------------------------------------------------------------------- sample data

_SAMPLE_SCHEMA = """
CREATE TYPE game_status AS ENUM ('waiting', 'playing', 'finished', 'aborted');

CREATE TABLE users (
    id            bigserial PRIMARY KEY,
    nickname      text NOT NULL UNIQUE,
    email         text UNIQUE,
    bio           text,
    settings      jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at    timestamptz NOT NULL,
    last_login_at timestamptz,
    CONSTRAINT users_nickname_length CHECK (char_length(nickname) BETWEEN 1 AND 32)
);
COMMENT ON TABLE users IS '끄투 플레이어 계정 (player accounts)';
COMMENT ON COLUMN users.settings IS 'client settings as JSON';

CREATE TABLE game_rooms (
    id          serial PRIMARY KEY,
    title       text NOT NULL,
    owner_id    bigint NOT NULL REFERENCES users (id),
    max_players smallint NOT NULL CHECK (max_players BETWEEN 2 AND 8),
    is_private  boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL
);

CREATE SEQUENCE game_no_seq START WITH 1000;

CREATE TABLE games (
    id          bigint PRIMARY KEY DEFAULT nextval('game_no_seq'),
    room_id     integer NOT NULL REFERENCES game_rooms (id) ON DELETE CASCADE,
    status      game_status NOT NULL DEFAULT 'waiting',
    started_at  timestamptz NOT NULL,
    ended_at    timestamptz,
    winner_id   bigint REFERENCES users (id),
    round_count integer NOT NULL DEFAULT 0
);
ALTER SEQUENCE game_no_seq OWNED BY games.id;

CREATE TABLE game_words (
    id        bigserial PRIMARY KEY,
    game_id   bigint NOT NULL REFERENCES games (id) ON DELETE CASCADE,
    user_id   bigint NOT NULL REFERENCES users (id),
    turn      integer NOT NULL,
    word      text NOT NULL,
    score     integer,
    played_at timestamptz NOT NULL,
    UNIQUE (game_id, turn)
);
CREATE INDEX game_words_user_played_idx ON game_words (user_id, played_at);

CREATE FUNCTION word_score(w text) RETURNS integer
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    -- Longer words score more; each character is worth 10 points, minimum 10.
    RETURN greatest(char_length(w), 1) * 10;
END;
$$;

CREATE FUNCTION game_words_before_write() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.word := btrim(NEW.word);
    IF NEW.score IS NULL THEN
        NEW.score := word_score(NEW.word);
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER game_words_before_write
    BEFORE INSERT OR UPDATE ON game_words
    FOR EACH ROW EXECUTE FUNCTION game_words_before_write();

CREATE VIEW game_summary AS
SELECT g.id            AS game_id,
       r.title         AS room_title,
       g.status,
       w.nickname      AS winner_nickname,
       count(gw.id)    AS word_count,
       coalesce(sum(gw.score), 0) AS total_score
FROM games g
JOIN game_rooms r ON r.id = g.room_id
LEFT JOIN users w ON w.id = g.winner_id
LEFT JOIN game_words gw ON gw.game_id = g.id
GROUP BY g.id, r.title, g.status, w.nickname;

CREATE SCHEMA stats;
CREATE TABLE stats.daily_activity (
    day          date PRIMARY KEY,
    games_played integer NOT NULL,
    words_played integer NOT NULL
);

CREATE TABLE attachments (
    id         integer PRIMARY KEY,
    name       text NOT NULL,
    body       text NOT NULL,
    blob       bytea NOT NULL
);
"""

_SAMPLE_DATA = """
INSERT INTO users (nickname, email, bio, settings, created_at, last_login_at)
VALUES ('끄아', 'kkua@example.com', '끝말잇기 챔피언',
        '{"theme": "dark", "volume": 80, "lang": "ko", "notifications": true}',
        '2024-01-01 09:00:00+09', '2024-06-01 21:30:00+09');

INSERT INTO users (nickname, email, bio, settings, created_at, last_login_at)
SELECT chr(44032 + (i * 37) % 11172) || chr(44032 + (i * 101) % 11172) || i::text,
       CASE WHEN i % 5 = 0 THEN NULL ELSE 'player' || i || '@example.com' END,
       CASE WHEN i % 3 = 0 THEN NULL ELSE '안녕하세요! 저는 ' || i || '번 플레이어입니다.' END,
       jsonb_build_object(
           'theme', (ARRAY['dark', 'light', 'system'])[1 + i % 3],
           'volume', (i * 13) % 101,
           'lang', CASE WHEN i % 4 = 0 THEN 'en' ELSE 'ko' END,
           'notifications', i % 2 = 0),
       timestamptz '2024-01-01 00:00:00+09' + i * interval '37 minutes',
       CASE WHEN i % 7 = 0 THEN NULL
            ELSE timestamptz '2024-03-01 00:00:00+09' + i * interval '5 hours' END
FROM generate_series(2, 200) AS i;

INSERT INTO game_rooms (title, owner_id, max_players, is_private, created_at)
SELECT '끝말잇기 방 #' || i,
       1 + (i * 7) % 200,
       2 + i % 7,
       i % 10 = 0,
       timestamptz '2024-02-01 12:00:00+09' + i * interval '3 hours'
FROM generate_series(1, 50) AS i;

INSERT INTO games (room_id, status, started_at, ended_at, winner_id, round_count)
SELECT 1 + i % 50,
       s.status,
       timestamptz '2024-02-02 00:00:00+09' + i * interval '47 minutes',
       CASE WHEN s.status IN ('finished', 'aborted')
            THEN timestamptz '2024-02-02 00:00:00+09' + i * interval '47 minutes' + interval '12 minutes' END,
       CASE WHEN s.status = 'finished' THEN 1 + (i * 11) % 200 END,
       CASE WHEN s.status = 'waiting' THEN 0 ELSE 1 + i % 9 END
FROM generate_series(1, 300) AS i,
     LATERAL (SELECT (ARRAY['finished', 'finished', 'playing', 'waiting', 'aborted']::game_status[])[1 + i % 5]
              AS status) AS s;

INSERT INTO game_words (game_id, user_id, turn, word, score, played_at)
SELECT 1000 + (i - 1) / 8,
       1 + (i * 17) % 200,
       1 + (i - 1) % 8,
       (ARRAY['사과', '과자', '자동차', '차표', '표범', '범고래', '래퍼', '퍼즐',
              '즐거움', '움직임', '임금님', '님프', '끄투', '투명인간', '간장', '장난감'])[1 + i % 16]
           || CASE WHEN i % 11 = 0 THEN '  ' ELSE '' END,
       CASE WHEN i % 6 = 0 THEN 100 END,
       timestamptz '2024-02-02 00:00:00+09' + i * interval '41 seconds'
FROM generate_series(1, 2000) AS i;

-- The next game number must survive a backup/restore: jump ahead explicitly.
SELECT setval('game_no_seq', 5000);

INSERT INTO stats.daily_activity (day, games_played, words_played)
SELECT d::date,
       (SELECT count(*) FROM games g WHERE (g.started_at AT TIME ZONE 'Asia/Seoul')::date = d::date),
       (SELECT count(*) FROM game_words w WHERE (w.played_at AT TIME ZONE 'Asia/Seoul')::date = d::date)
FROM generate_series(date '2024-02-01', date '2024-03-31', interval '1 day') AS d;

-- One large row: ~5 MiB of text and ~1 MiB of bytea (both TOASTed, deterministic).
INSERT INTO attachments (id, name, body, blob)
SELECT 1, '대용량-리플레이.log',
       (SELECT string_agg(md5(i::text), '' ORDER BY i) FROM generate_series(1, 163840) AS i),
       (SELECT decode(string_agg(md5('blob' || i), '' ORDER BY i), 'hex') FROM generate_series(1, 65536) AS i);
"""

SAMPLE_LARGE_TEXT_BYTES = 163840 * 32
"""Length in bytes (and characters) of ``attachments.body`` created by :func:`create_sample_data`."""
SAMPLE_LARGE_BYTEA_BYTES = 65536 * 16
"""Length in bytes of ``attachments.blob`` created by :func:`create_sample_data`."""
SAMPLE_SEQUENCE_VALUE = 5000
"""``last_value`` of ``game_no_seq`` after :func:`create_sample_data` (so ``nextval`` returns 5001)."""


def create_sample_data(conn: psycopg.Connection[Any]) -> None:
    """Create a small deterministic game-backend schema with data (~2,600 rows plus one ~6 MB row) in one transaction.

    Raises psycopg.Error if any object already exists or the statements fail.
    """
    with conn.transaction():
        conn.execute(_SAMPLE_SCHEMA)
        conn.execute(_SAMPLE_DATA)


# --------------------------------------------------------------------------- bulk data

def table_contents(conn: psycopg.Connection[Any]) -> dict[str, list[str]]:
    """Every user table's rows as text, sorted, keyed by `schema.table`, for exact before/after checks."""
    tables = conn.execute(
        "SELECT schemaname, tablename FROM pg_tables"
        " WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2"
    ).fetchall()
    out: dict[str, list[str]] = {}
    for schema, table in tables:
        rows = conn.execute(sql.SQL("SELECT t::text FROM {} t").format(sql.Identifier(schema, table))).fetchall()
        out[f"{schema}.{table}"] = sorted(str(r[0]) for r in rows)
    return out


def schema_dump(server: ThrowawayPostgres, dbname: str) -> str:
    """`pg_dump --schema-only` of a database (version banner lines removed), for comparing schemas.

    Raises subprocess.CalledProcessError if pg_dump fails.
    """
    out = subprocess.run(
        [server._bin("pg_dump"), "--schema-only", "--host", server.host, "--port", str(server.port),
         "--username", server.user, "--dbname", dbname],
        env=dict(os.environ, PGPASSWORD=server.password), capture_output=True, text=True, check=True,
    ).stdout
    # The version banner and the random \restrict key differ between any two dumps.
    return "\n".join(line for line in out.splitlines()
                     if not line.startswith(("-- Dumped", "\\restrict ", "\\unrestrict ")))
