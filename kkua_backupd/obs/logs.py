"""Logging: one line per event on the console (journald-ready) and in the guide's log files.

Under systemd (`JOURNAL_STREAM` set) each console line starts with a `<N>` syslog priority and carries
no timestamp or colour, since journald adds its own. The files in `log_dir` (backup.log, restore.log, ...)
get a timestamp and the level in words. Known secrets are masked in every line, whatever its source.

structlog is imported when a line is first logged, not before: a command that only prints (`status`,
`list`) starts without it (docs/performance.md, start-up).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from kkua_backupd.safefs import FILE_MODE, open_file

if TYPE_CHECKING:
    from types import ModuleType

PRIORITY = {"debug": 7, "info": 6, "notice": 5, "warning": 4, "error": 3, "critical": 2}
_SECRET_MASK = "<redacted>"  # noqa: S105 (the marker, not a secret)
RECENT_LINES = 200  # kept for failure notices (obs/notifications.py sends the last of them)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.3f}".rstrip("0").rstrip(".") if value % 1 else str(int(value))
    elif isinstance(value, Path):
        text = str(value)
    else:
        text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def render_fields(fields: MutableMapping[str, Any]) -> str:
    """Render event fields as `key=value` pairs, quoting values that need it."""
    return " ".join(f"{k}={_format_value(v)}" for k, v in fields.items() if v is not None)


class LogSink:
    """The final structlog processor: writes each event to the console and the open log files."""

    def __init__(self, console: TextIO, *, journald: bool, min_level: str = "info") -> None:
        self.console = console
        self.journald = journald
        self.min_priority = PRIORITY[min_level]
        self.files: dict[str, TextIO] = {}
        self.secrets: set[str] = set()
        self.before_console: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self._recent: deque[str] = deque(maxlen=RECENT_LINES)

    def add_secret(self, secret: str | None) -> None:
        """Mask this value wherever it would appear in a log line."""
        if secret and len(secret) >= 3:
            self.secrets.add(secret)

    def mask(self, text: str) -> str:
        """Replace every registered secret in `text` by a marker."""
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, _SECRET_MASK)
        return text

    def open_file(self, log_dir: Path, name: str) -> Path | None:
        """Also append events to `log_dir/name` (0640, folder 0750, whatever the umask); when it cannot be
        opened warn on the console; raises Refused when it is a symlink or not the tool's file."""
        path = log_dir / name
        if name in self.files:
            return path
        try:
            # A symlink or a stranger's file is refused (Refused, exit 3): lines are never appended to
            # whatever a log name points at (docs/security.md).
            fd = open_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE, root=log_dir)
        except OSError as exc:
            self._console_line("warning", f"log file {path} cannot be opened ({exc.strerror}); "
                               "logging to the console only", {})
            return None
        self.files[name] = os.fdopen(fd, "a", encoding="utf-8", buffering=1)
        return path

    def recent(self, count: int) -> list[str]:
        """The last `count` lines logged by this process at info level or above (debug too with -v), masked,
        each with its time and level: what a failure notice carries."""
        with self._lock:
            return list(self._recent)[-count:] if count > 0 else []

    def close(self) -> None:
        """Close every log file."""
        for fh in self.files.values():
            fh.close()
        self.files.clear()

    def _console_line(self, level: str, event: str, fields: MutableMapping[str, Any]) -> None:
        text = self.mask(f"{event} {render_fields(fields)}".rstrip())
        if self.journald:
            line = f"<{PRIORITY.get(level, 6)}>{text}"
        else:
            now = dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
            line = f"{now} {level.upper():<7} {text}"
        if self.before_console is not None:
            self.before_console()
        try:
            self.console.write(line + "\n")
            self.console.flush()
        except (BrokenPipeError, ValueError):
            pass

    def __call__(self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> Any:
        level = str(event_dict.pop("level", method_name)).lower()
        if level == "exception":
            level = "error"
        event_dict.pop("timestamp", None)
        event = str(event_dict.pop("event", ""))
        with self._lock:
            if PRIORITY.get(level, 6) <= self.min_priority:
                self._console_line(level, event, event_dict)
                stamp = dt.datetime.now().astimezone().strftime("%H:%M:%S")
                self._recent.append(self.mask(f"{stamp} {level.upper()} {event} {render_fields(event_dict)}".rstrip()))
            if self.files:
                stamp = dt.datetime.now().astimezone().isoformat(timespec="seconds")
                text = self.mask(f"{stamp} [{level.upper()}] {event} {render_fields(event_dict)}".rstrip())
                for fh in self.files.values():
                    with contextlib.suppress(OSError):
                        fh.write(text + "\n")
        raise _structlog().DropEvent


_sink: LogSink | None = None
_configured: list[LogSink | None] = [None]  # the sink structlog's chain ends with now


def setup(*, to_stderr: bool = False, verbose: bool = False) -> LogSink:
    """Configure structlog for this process and return the sink (console on stdout unless `to_stderr`)."""
    global _sink
    journald = bool(os.environ.get("JOURNAL_STREAM"))
    sink = LogSink(sys.stderr if to_stderr else sys.stdout, journald=journald,
                   min_level="debug" if verbose else "info")
    if _sink is not None:
        _sink.close()
    _sink = sink
    if "structlog" in sys.modules:  # loaded already: configure now, as the loggers bound before expect
        _structlog()
    return sink


def _structlog() -> ModuleType:
    """structlog, configured for the sink `setup` made (imported on the first line logged)."""
    import structlog

    if _sink is not None and _configured[0] is not _sink:
        structlog.configure(
            processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level, _sink],
            wrapper_class=structlog.make_filtering_bound_logger(0),
            cache_logger_on_first_use=False,
        )
        _configured[0] = _sink
    return structlog


class _Logger:
    """What `get_logger` returns: the fields to bind, and the structlog logger made from them on the first
    line logged (`bind` needs no structlog). Every other attribute is the structlog logger's."""

    __slots__ = ("_bound", "_fields")

    def __init__(self, fields: dict[str, Any]) -> None:
        self._fields = fields
        self._bound: Any = None

    def bind(self, **fields: Any) -> _Logger:
        return _Logger({**self._fields, **fields})

    def __getattr__(self, name: str) -> Any:
        if self._bound is None:
            self._bound = _structlog().get_logger().bind(**self._fields)
        return getattr(self._bound, name)


def sink() -> LogSink:
    """The sink configured by `setup` (a console-only one if nothing was set up yet)."""
    return _sink if _sink is not None else setup()


def get_logger(**fields: Any) -> Any:
    """A structlog logger with `fields` bound to every event it logs (structlog itself is imported when the
    first line is logged)."""
    return _Logger(fields)
