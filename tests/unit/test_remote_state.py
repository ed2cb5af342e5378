"""What the state keeps of pushes: pending sets with the time they first became pending, kept when a remote
could not even be listed, cleared when it was; and what `status` shows of it."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from kkua_backupd.config import Config, RemoteConfig
from kkua_backupd.core import state
from kkua_backupd.core.remotes import _wanted
from kkua_backupd.store.storage import BackupSet, Manifest, ManifestFile


def config(tmp_path: Path) -> Config:
    remote = RemoteConfig(name="offsite", url="s3://bucket/x", keep_last=2, days=10)
    return Config(backup_dir=tmp_path / "b", log_dir=tmp_path / "l", remote=[remote])


def test_pending_sets_keep_their_first_time_until_sent(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    state.mark_pending(cfg, "offsite", ["postgres/20261129_020000"])
    first = state.remote_status(cfg)["offsite"]["pending"][0]["since"]
    state.record_push(cfg, "offsite", sent=[], pending=[], error="remote offsite: connection refused", complete=False)
    doc = state.remote_status(cfg)["offsite"]
    assert doc["pending"] == [{"set": "postgres/20261129_020000", "since": first}]  # could not list: still pending
    assert doc["last_error"] == "remote offsite: connection refused" and doc["failures"] == 1
    lines = state.format_status(state.status_report(cfg))
    assert any(line.startswith("  pending   1 set(s) since") for line in lines)
    state.record_push(cfg, "offsite", sent=["postgres/20261129_020000"], pending=[], error=None, complete=True)
    doc = state.remote_status(cfg)["offsite"]
    assert doc["pending"] == [] and doc["last_error"] is None and doc["failures"] == 0 and doc["last_success"]
    assert state.pending_uploads(cfg) == {}


def _set(folder: Path, set_id: str, created: dt.datetime) -> BackupSet:
    manifest = Manifest(kind="postgres", id=set_id, prefix="kkua_backup_", created_at=created,
                        files=[ManifestFile(name=f"kkua_backup_{set_id}.sql.gz", size=1, sha256="0" * 64)])
    (folder / manifest.files[0].name).write_bytes(b"x")
    return BackupSet(folder, manifest)


def test_push_sends_what_the_remotes_retention_would_keep(tmp_path: Path) -> None:
    folder = tmp_path / "postgres"
    folder.mkdir()
    now = dt.datetime(2026, 11, 29, 12, tzinfo=dt.UTC)
    sets = [_set(folder, f"2026{month:02d}01_020000", dt.datetime(2026, month, 1, 2, tzinfo=dt.UTC))
            for month in (11, 10, 9, 8)] + [_set(folder, "20261128_020000", now - dt.timedelta(days=1))]
    sets.sort(key=lambda s: s.manifest.created_at if s.manifest else now, reverse=True)
    remote = config(tmp_path).remote[0]  # keep_last 2, days 10
    assert [s.id for s in _wanted(sets, remote, now)] == ["20261128_020000", "20261101_020000"]
