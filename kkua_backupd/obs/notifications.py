"""Notices of a job's start, success and failure: healthchecks.io-style pings and a generic JSON webhook.

Not to be confused with daemon/notify.py (sd_notify to systemd). A notice never fails a job and never holds
it up for long: each attempt has a short timeout, a failed attempt is logged and retried once, and then the
job goes on. The URLs are secrets (they let anyone post as this host): they are masked in every log line and
never appear in an error.

- healthchecks (healthchecks.io, or a self-hosted one): `URL/start` when a job starts, `URL` on success,
  `URL/fail` on failure with the last log lines as the body; each with `rid=` (one id per run), so
  PostgreSQL and Redis runs that overlap are told apart.
- webhook: a JSON POST on success and failure: `event`, `job`, `host`, `at`, `message`, `text` (one line, for
  Slack-like incoming hooks and ntfy), `log_tail` and `details`. An Uptime Kuma push URL (`/api/push/...`) also
  gets `status=up|down` and `msg=` in its query, which is what Kuma reads.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from kkua_backupd.obs import logs

Event = Literal["start", "success", "failure"]
RETRY_PAUSE = 1.0  # seconds between an attempt that failed and the one retry


@dataclass(frozen=True)
class Notice:
    """What is said about one moment of one run of a job."""

    job: str
    event: Event
    run_id: str
    message: str
    log_tail: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    at: str = ""

    @property
    def text(self) -> str:
        """One line for a person: `kkua-backup postgres on db1: failed: ...`."""
        return f"kkua-backup {self.job} on {socket.gethostname()}: {self.message}"


def new_run_id() -> str:
    """An id for one run, sent with every notice of it (healthchecks' `rid`)."""
    return str(uuid.uuid4())


def _with_path(url: str, suffix: str, query: dict[str, str]) -> str:
    parts = urllib.parse.urlsplit(url)
    path = parts.path.rstrip("/") + suffix if suffix else parts.path
    extra = urllib.parse.urlencode(query)
    joined = f"{parts.query}&{extra}" if parts.query and extra else parts.query or extra
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, joined, parts.fragment))


def healthchecks_request(base: str, notice: Notice) -> tuple[str, bytes]:
    """The URL and body of a healthchecks ping for `notice`."""
    suffix = {"start": "/start", "success": "", "failure": "/fail"}[notice.event]
    body = notice.text if notice.event != "failure" else "\n".join([notice.text, "", *notice.log_tail])
    return _with_path(base, suffix, {"rid": notice.run_id}), body.encode("utf-8")


def webhook_request(url: str, notice: Notice) -> tuple[str, bytes]:
    """The URL and JSON body of a webhook call for `notice`."""
    doc = {"event": notice.event, "job": notice.job, "host": socket.gethostname(), "at": notice.at,
           "run_id": notice.run_id, "message": notice.message, "text": notice.text, "log_tail": notice.log_tail,
           "details": notice.details}
    if "/api/push/" in urllib.parse.urlsplit(url).path:  # Uptime Kuma reads status and msg from the query
        url = _with_path(url, "", {"status": "down" if notice.event == "failure" else "up", "msg": notice.message})
    return url, json.dumps(doc, ensure_ascii=False, default=str).encode("utf-8")


class Notifier:
    """Sends notices to the configured healthchecks and webhook URLs (either may be None)."""

    def __init__(self, *, healthchecks_url: str | None, webhook_url: str | None, timeout: float,
                 log: Any = None) -> None:
        self.healthchecks_url = healthchecks_url
        self.webhook_url = webhook_url
        self.timeout = timeout
        self.log = log if log is not None else logs.get_logger()
        for url in (healthchecks_url, webhook_url):
            logs.sink().add_secret(url)  # an error text quoting the URL is masked too
        self._pending: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.healthchecks_url or self.webhook_url)

    def _targets(self, notice: Notice) -> list[tuple[str, str, bytes, str]]:
        targets = []
        if self.healthchecks_url:
            url, body = healthchecks_request(self.healthchecks_url, notice)
            targets.append(("healthchecks", url, body, "text/plain; charset=utf-8"))
        if self.webhook_url and notice.event != "start":
            url, body = webhook_request(self.webhook_url, notice)
            targets.append(("webhook", url, body, "application/json"))
        return targets

    def _post(self, url: str, body: bytes, content_type: str) -> None:
        import urllib.request  # here: http.client, ssl and email cost a run with no notice URL ~0.02 s

        request = urllib.request.Request(url, data=body, method="POST",  # noqa: S310 - http(s) only (config)
                                         headers={"Content-Type": content_type, "User-Agent": "kkua-backup"})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 - http(s) only
            response.read(65536)

    def _deliver_one(self, target: str, url: str, body: bytes, content_type: str, event: Event) -> None:
        import urllib.error

        for attempt in (1, 2):
            try:
                self._post(url, body, content_type)
                return
            except (OSError, urllib.error.URLError, ValueError) as exc:  # HTTPError, timeouts: OSErrors
                reason = f"HTTP {exc.code}" if isinstance(exc, urllib.error.HTTPError) else \
                    str(getattr(exc, "reason", exc)) or type(exc).__name__
                if attempt == 1:
                    self.log.warning(f"{target} notice failed; retrying once", notice=event,
                                     reason=logs.sink().mask(reason))
                    time.sleep(RETRY_PAUSE)
                else:
                    self.log.warning(f"{target} notice failed again; the job goes on without it",
                                     notice=event, reason=logs.sink().mask(reason))

    def _deliver(self, notice: Notice) -> None:
        """Every URL at once (a hanging one does not hold up the other), each tried at most twice."""
        threads = [threading.Thread(target=self._deliver_one, args=(*target, notice.event), name="notify", daemon=True)
                   for target in self._targets(notice)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=2 * self.timeout + RETRY_PAUSE + 1)

    def send(self, notice: Notice) -> None:
        """Deliver `notice` now, after any notice still being sent in the background (so they arrive in
        order); at most two attempts of `timeout` seconds per URL. Never raises."""
        self.wait()
        if self.enabled:
            self._deliver(notice)

    def send_in_background(self, notice: Notice) -> None:
        """Deliver `notice` in a thread, so the job need not wait for it (the start ping)."""
        self.wait()
        if self.enabled:
            self._pending = threading.Thread(target=self._deliver, args=(notice,), name="notify", daemon=True)
            self._pending.start()

    def wait(self) -> None:
        """Wait for the notice being sent in the background, if any (bounded by its attempts' timeouts)."""
        if self._pending is not None:
            self._pending.join(timeout=2 * self.timeout + RETRY_PAUSE + 1)
            self._pending = None
