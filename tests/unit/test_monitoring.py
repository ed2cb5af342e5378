"""Monitoring's pure parts: config errors a person can act on, the metrics text, the notices' requests (sent to
a real local HTTP receiver), `check`'s exit codes, when a job is overdue, which jobs a failed unit ran."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pytest

from kkua_backupd.config import Config, load_config, redacted
from kkua_backupd.core import health, observe, state
from kkua_backupd.errors import ConfigError, KkuaError
from kkua_backupd.obs import metrics
from kkua_backupd.obs.notifications import Notice, Notifier, healthchecks_request, webhook_request
from tests.support.node_exporter import samples
from tests.support.receiver import Receiver


def problems_of(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), env or {})
    return info.value.problems


# ---------------------------------------------------------------------------------------------
# config errors


def test_unknown_keys_suggest_the_nearest_known_one(tmp_path: Path) -> None:
    found = problems_of(tmp_path, '[postgres]\ndatabse = "kkua"\n[postgress]\nport = 1\n[redis]\nzzz = 1\n')
    assert any(p.startswith("postgres.databse: unknown key; did you mean `database`?") for p in found)
    assert any(p.startswith("postgress: unknown key; did you mean `postgres`?") for p in found)
    zzz = next(p for p in found if p.startswith("redis.zzz"))
    assert "unknown key (known keys here: host, port," in zzz and "password," not in zzz  # secrets not offered


def test_a_wrong_type_shows_the_value_given(tmp_path: Path) -> None:
    found = problems_of(tmp_path, '[postgres]\nport = "5432x"\n[redis]\naof = "yes"\n')
    assert any(p.startswith("postgres.port: Input should be a valid integer; given: '5432x'") for p in found)
    assert any("redis.aof" in p and "given: 'yes'" in p for p in found)


def test_a_compression_level_that_does_not_fit_is_reported_with_the_other_problems(tmp_path: Path) -> None:
    found = problems_of(tmp_path, '[postgres]\ncompression_level = 12\nport = "x"\n[retention]\ndays = 0\n')
    assert [p.split(":")[0] for p in found] == ["postgres.port", "postgres.compression_level", "retention.days"]
    assert "compression_level must be 1 to 9 for gzip, not 12" in found[1]


def test_notify_urls_are_secrets_from_files_or_the_environment(tmp_path: Path) -> None:
    found = problems_of(tmp_path, '[notify]\nhealthchecks_url = "https://hc-ping.com/abc"\n')
    assert found[0].startswith("notify.healthchecks_url: the URL is a secret")
    assert "hc-ping.com/abc" not in "\n".join(found)

    url_file = tmp_path / "hc.url"
    url_file.write_text("https://hc.example/ping/secret-uuid\n")
    url_file.chmod(0o644)
    found = problems_of(tmp_path, f'[notify]\nhealthchecks_url_file = "{url_file}"\n')
    assert "readable by others" in found[0]
    url_file.chmod(0o600)
    (tmp_path / "config.toml").write_text(f'[notify]\nhealthchecks_url_file = "{url_file}"\n')
    loaded = load_config(str(tmp_path / "config.toml"), {"KKUA_WEBHOOK_URL": "https://hooks.example/T0/secret"})
    notify = loaded.config.notify
    assert notify.healthchecks_url is not None
    assert notify.healthchecks_url.get_secret_value() == "https://hc.example/ping/secret-uuid"
    assert notify.webhook_url is not None
    shown = json.dumps(redacted(loaded.config))
    assert "secret-uuid" not in shown and "T0/secret" not in shown and shown.count("<redacted>") == 2

    found = problems_of(tmp_path, "", {"KKUA_WEBHOOK_URL": "ftp://nope"})
    assert found == ["notify.webhook_url: not an http:// or https:// URL (KKUA_WEBHOOK_URL (environment))"]


@pytest.mark.parametrize("listen", ["9187", "localhost:", ":9187", "127.0.0.1:99999", "host:port"])
def test_a_bad_listen_address_is_refused(tmp_path: Path, listen: str) -> None:
    found = problems_of(tmp_path, f'[metrics]\nlisten = "{listen}"\n')
    assert found[0].startswith("metrics.listen: listen must be HOST:PORT")


# ---------------------------------------------------------------------------------------------
# metrics


RECORDS = {
    "postgres": {"last_start": "2026-11-29T02:00:00+09:00", "last_end": "2026-11-29T02:00:30+09:00",
                 "last_result": "ok", "last_finished_result": "ok", "last_success": "2026-11-29T02:00:30+09:00",
                 "last_duration": 30.5, "last_size": 1234, "last_rows": 99, "runs_total": 3, "failures_total": 1,
                 "test_restore_at": "2026-11-29T02:00:29+09:00", "test_restore_ok": False},
    "redis": {"last_start": "2026-11-29T03:00:00+09:00", "last_result": "running", "last_finished_result": "failed",
              "runs_total": 1, "failures_total": 1},
    "retention": {},
}


def test_the_metrics_text_parses_and_says_what_the_records_say() -> None:
    found = samples(metrics.render(RECORDS).decode())
    pg = (("backup_job", "postgres"),)
    redis = (("backup_job", "redis"),)
    success = dt.datetime.fromisoformat("2026-11-29T02:00:30+09:00").timestamp()
    assert found[("kkua_backup_last_success_timestamp_seconds", pg)] == success
    assert found[("kkua_backup_last_duration_seconds", pg)] == 30.5
    assert found[("kkua_backup_last_size_bytes", pg)] == 1234
    assert found[("kkua_backup_last_rows", pg)] == 99
    assert found[("kkua_backup_last_test_restore_success", pg)] == 0
    assert found[("kkua_backup_runs_total", pg)] == 3
    assert found[("kkua_backup_failures_total", pg)] == 1
    assert found[("kkua_backup_last_run_success", pg)] == 1
    assert found[("kkua_backup_last_run_success", redis)] == 0  # the last finished run, while one runs
    assert found[("kkua_backup_running", redis)] == 1
    assert ("kkua_backup_last_success_timestamp_seconds", redis) not in found  # never succeeded: no sample
    assert not any(name == "kkua_backup_since_last_completion_seconds" for name, _ in found)
    live = samples(metrics.render(RECORDS, live=True).decode())
    assert live[("kkua_backup_since_last_completion_seconds", pg)] > 0


REMOTES = {
    "offsite": {"url": "s3://b/p",
                "pending": [{"set": "postgres/20261129_020000", "since": "2026-11-29T02:00:41+09:00"},
                            {"set": "redis/20261129_030000", "since": "2026-11-29T03:00:05+09:00"}],
                "pending_since": "2026-11-29T02:00:41+09:00", "last_attempt": "2026-11-29T03:00:06+09:00",
                "last_success": "2026-11-28T02:00:40+09:00", "last_error": "remote offsite: HTTP 403", "failures": 2},
    "box": {"url": "sftp://k@h/srv", "pending": [], "pending_since": None, "last_attempt": "2026-11-29T02:00:50+09:00",
            "last_success": "2026-11-29T02:00:50+09:00", "last_error": None, "failures": 0},
    "new": {"url": "sftp://k@h2/srv", "pending": [], "pending_since": None, "last_attempt": None,
            "last_success": None, "last_error": None, "failures": 0},
}


def test_the_remote_metrics_say_what_is_pending_since_when_and_how_the_last_push_went() -> None:
    found = samples(metrics.render({}, remotes=REMOTES).decode(), "kkua_backup_remote_")
    offsite, box, new = ((("remote", name),) for name in ("offsite", "box", "new"))

    def stamp(text: str) -> float:
        return dt.datetime.fromisoformat(text).timestamp()

    assert found[("kkua_backup_remote_pending_sets", offsite)] == 2
    assert found[("kkua_backup_remote_pending_since_timestamp_seconds", offsite)] == stamp("2026-11-29T02:00:41+09:00")
    assert found[("kkua_backup_remote_last_push_timestamp_seconds", offsite)] == stamp("2026-11-29T03:00:06+09:00")
    assert found[("kkua_backup_remote_last_push_success_timestamp_seconds", offsite)] == \
        stamp("2026-11-28T02:00:40+09:00")
    assert found[("kkua_backup_remote_last_push_success", offsite)] == 0
    assert found[("kkua_backup_remote_pending_sets", box)] == 0
    assert ("kkua_backup_remote_pending_since_timestamp_seconds", box) not in found  # nothing pending: no sample
    assert found[("kkua_backup_remote_last_push_success", box)] == 1
    assert found[("kkua_backup_remote_pending_sets", new)] == 0  # configured, never pushed: only the count
    assert [key for key in found if key[1] == new] == [("kkua_backup_remote_pending_sets", new)]
    assert not samples(metrics.render({}).decode(), "kkua_backup_remote_")  # no remote, no sample


def test_an_upload_is_a_status_problem_after_twice_overdue_after(tmp_path: Path) -> None:
    config = Config.model_validate({"backup_dir": str(tmp_path),
                                    "schedule": {"timezone": "Asia/Seoul", "overdue_after": 3600}})
    moment = dt.datetime(2026, 11, 29, 4, 0, 41, tzinfo=dt.timezone(dt.timedelta(hours=9)))
    remotes = {name: dict(doc) for name, doc in REMOTES.items()}
    assert health.upload_problems(config, remotes, moment) == {}  # exactly 2 h: not yet
    later = moment + dt.timedelta(seconds=1)
    assert health.upload_problems(config, remotes, later) == {"offsite": [
        "upload pending for more than 2 h: 2 set(s) since 2026-11-29T02:00:41+09:00; last push failed: "
        "remote offsite: HTTP 403"]}
    patient = Config.model_validate({"backup_dir": str(tmp_path), "schedule": {"overdue_after": 7200}})
    assert health.upload_problems(patient, remotes, later) == {}
    report = state.status_report(config)
    report["remotes"] = {name: dict(doc) for name, doc in REMOTES.items()}
    report["remotes"]["offsite"]["pending_since"] = "2020-01-01T00:00:00+00:00"
    problems = health.mark_problems(config, report)
    assert list(problems) == ["remote offsite"] and report["ok"] is False
    assert report["remotes"]["offsite"]["ok"] is False and report["remotes"]["offsite"]["problems"]
    assert report["remotes"]["box"] | {"ok": True, "problems": []} == report["remotes"]["box"]


def test_the_textfile_is_replaced_whole_and_never_written_through_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("not ours\n")
    path = tmp_path / "kkua_backup.prom"
    path.symlink_to(target)
    old_umask = os.umask(0o077)
    try:
        metrics.write_textfile(path, RECORDS)
    finally:
        os.umask(old_umask)
    assert target.read_text() == "not ours\n"
    assert not path.is_symlink() and path.stat().st_mode & 0o777 == 0o644
    assert samples(path.read_text(), "kkua_backup_runs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "kkua_backup.prom"]
    with pytest.raises(KkuaError, match="cannot write the metrics file .*: No such file or directory"):
        metrics.write_textfile(tmp_path / "missing" / "x.prom", RECORDS)


# ---------------------------------------------------------------------------------------------
# notices


NOTICE = Notice("postgres", "failure", "rid-1", "failed: disk full", log_tail=["a", "b"], at="2026-11-29T02:00:00Z")


def test_healthchecks_urls_and_bodies() -> None:
    url, body = healthchecks_request("https://hc.example/ping/uuid/", NOTICE)
    assert url == "https://hc.example/ping/uuid/fail?rid=rid-1"
    assert body.decode().endswith("failed: disk full\n\na\nb")
    start = Notice("redis", "start", "r2", "started")
    assert healthchecks_request("https://hc.example/ping/uuid?x=1", start)[0] == \
        "https://hc.example/ping/uuid/start?x=1&rid=r2"
    ok = Notice("redis", "success", "r2", "succeeded")
    assert healthchecks_request("https://hc.example/ping/uuid", ok)[0] == "https://hc.example/ping/uuid?rid=r2"


def test_webhook_bodies_and_uptime_kuma() -> None:
    url, body = webhook_request("https://hooks.example/T0/B1", NOTICE)
    doc = json.loads(body)
    assert url == "https://hooks.example/T0/B1"
    assert doc["event"] == "failure" and doc["log_tail"] == ["a", "b"] and "failed: disk full" in doc["text"]
    url, _ = webhook_request("https://kuma.example/api/push/TOKEN", NOTICE)
    assert url == "https://kuma.example/api/push/TOKEN?status=down&msg=failed%3A+disk+full"


def test_a_notifier_sends_in_order_and_survives_a_dead_receiver() -> None:
    with Receiver() as receiver:
        tell = Notifier(healthchecks_url=f"{receiver.url}/hc/x", webhook_url=f"{receiver.url}/hook", timeout=5)
        tell.send_in_background(Notice("postgres", "start", "r", "started"))
        tell.send(Notice("postgres", "success", "r", "succeeded"))
        paths = [r.path for r in receiver.requests]
        # The start ping first, then the success notice to both URLs, which go out in parallel (so either may
        # arrive first), each exactly once.
        assert paths[0] == "/hc/x/start" and sorted(paths[1:]) == ["/hc/x", "/hook"], paths
    dead = Notifier(healthchecks_url=receiver.url + "/hc/x", webhook_url=None, timeout=1)
    dead.send(NOTICE)  # connection refused twice: logged, not raised


# ---------------------------------------------------------------------------------------------
# check and status


def test_check_exit_codes_follow_nagios() -> None:
    def results(*levels: health.Level) -> list[health.CheckResult]:
        return [health.CheckResult("x", level, "m") for level in levels]
    assert health.exit_code(results("OK", "OK")) == 0
    assert health.exit_code(results("OK", "WARN")) == 1
    assert health.exit_code(results("WARN", "FAIL", "UNKNOWN")) == 2
    assert health.exit_code(results("WARN", "UNKNOWN")) == 3
    line = health.CheckResult("postgres.read", "FAIL", "cannot read t", "GRANT SELECT").line()
    assert line == "FAIL postgres.read: cannot read t; fix: GRANT SELECT"


def test_a_check_that_raises_is_unknown_not_ok(tmp_path: Path) -> None:
    def check_broken(config: Config) -> list[health.CheckResult]:
        raise RuntimeError("boom")
    found = health.run_checks(Config(backup_dir=tmp_path), [check_broken])
    assert [(r.name, r.level) for r in found] == [("broken", "UNKNOWN")]


def test_a_job_is_overdue_one_interval_and_the_slack_after_its_last_success(tmp_path: Path) -> None:
    config = Config.model_validate({"backup_dir": str(tmp_path),
                                    "schedule": {"timezone": "Asia/Seoul", "overdue_after": 3600}})
    zone = dt.timezone(dt.timedelta(hours=9))
    entry = {"last_result": "ok", "last_success": "2026-11-28T02:01:00+09:00"}
    at = dt.datetime(2026, 11, 29, 2, 59, tzinfo=zone)
    assert health.overdue_since(config, "postgres", entry, at) is None
    since = health.overdue_since(config, "postgres", entry, at + dt.timedelta(minutes=2))
    assert since == dt.datetime(2026, 11, 29, 2, 0, tzinfo=zone)
    assert health.overdue_since(config, "postgres", {}, at + dt.timedelta(days=9)) is None  # never ran


def test_status_problems_and_one_zone(tmp_path: Path) -> None:
    config = Config.model_validate({"backup_dir": str(tmp_path), "schedule": {"timezone": "Asia/Seoul"}})
    with state.update(config) as data:
        data["jobs"]["postgres"] = {"last_start": "2026-11-28T17:00:00+00:00", "last_end": "2026-11-28T17:00:09+00:00",
                                    "last_result": "failed", "error": "disk full"}
    report = state.status_report(config)
    problems = health.mark_problems(config, report)
    assert problems == {"postgres": ["last run failed: disk full"]}
    assert report["ok"] is False and report["jobs"]["redis"]["ok"] is True
    assert report["jobs"]["postgres"]["last_run"] == "2026-11-29T02:00:00+09:00"
    assert report["timezone"] == "Asia/Seoul (UTC+09:00)"


def test_the_jobs_of_a_failed_unit() -> None:
    assert observe.unit_jobs("kkua-backup@postgres.service") == ["postgres"]
    assert observe.unit_jobs("kkua-backup@run") == ["postgres", "redis", "retention"]
    assert observe.unit_jobs("kkua-backupd.service") == []
    with pytest.raises(KkuaError, match="not a kkua-backup unit"):
        observe.unit_jobs("sshd.service")
