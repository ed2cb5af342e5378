"""The backup flow written once (core/flows.py), with a small data source of its own that writes a real set
through the byte chain: the flow makes the folder, removes partial files of killed runs, holds the kind's
lock only while the source captures, and leaves nothing behind when the capture fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from kkua_backupd.config import Config
from kkua_backupd.core import flows
from kkua_backupd.core.context import JobContext, VerifyReport
from kkua_backupd.errors import JobError
from kkua_backupd.obs import logs
from kkua_backupd.sources import BackupOptions
from kkua_backupd.store import storage
from kkua_backupd.store.lock import holder_of
from kkua_backupd.store.storage import BackupSet, Kind, Manifest, ManifestFile
from kkua_backupd.stream.chain import open_chain


class TextSource:
    """A data source whose "server" is a few bytes: enough to see what the flow does around a capture."""

    kind: Kind = "redis"

    def __init__(self, backup_dir: Path, *, fail: bool = False) -> None:
        self.backup_dir = backup_dir
        self.fail = fail
        self.seen: list[str] = []

    def capture(self, ctx: JobContext, folder: Path, options: BackupOptions, started: float) -> Manifest:
        holder = holder_of(self.backup_dir, self.kind)
        self.seen.append(f"capture: lock {holder and holder.get('purpose')}, "
                         f"partials {sorted(p.name for p in folder.glob('*.partial'))}, aof {options.aof}")
        prefix = storage.PREFIXES[self.kind]["backup"]
        set_id, created = storage.new_set_id(folder, prefix)
        with open_chain(folder / storage.data_file_name(prefix, set_id, ".rdb", "gzip"), "gzip", None, 1,
                        ctx.stages) as out:
            out.write(b"REDIS0011" + b"x" * 100_000)
            if self.fail:
                raise JobError("the server went away")
            info = out.close()
        data = storage.base_manifest(self.kind, "backup", prefix, set_id, created)
        data.update(status="ok", details={}, files=[ManifestFile(name=info.name, size=info.size,
                                                                 sha256=info.sha256, role="rdb",
                                                                 compression="gzip")])
        manifest = Manifest.model_validate(data)
        storage.write_manifest(folder, manifest)
        return manifest

    def finished(self, ctx: JobContext, manifest: Manifest, started: float) -> None:
        self.seen.append(f"finished: lock {holder_of(self.backup_dir, self.kind)}")

    def verify_set(self, ctx: JobContext, backup_set: BackupSet, *, restore_test: bool) -> VerifyReport:
        return VerifyReport(kind=backup_set.kind, id=backup_set.id, name=backup_set.name, ok=True)


@pytest.fixture
def ctx(tmp_path: Path) -> JobContext:
    config = Config.model_validate({"backup_dir": str(tmp_path / "backups"), "log_dir": str(tmp_path / "logs")})
    return JobContext(config=config, log=logs.get_logger(job="redis"))


def test_the_flow_cleans_locks_and_hands_the_source_its_folder(ctx: JobContext) -> None:
    backup_dir = ctx.config.backup_dir
    (backup_dir / "redis").mkdir(parents=True, mode=0o750)
    (backup_dir / "redis" / "redis_backup_20200101_030000.rdb.gz.partial").write_bytes(b"killed run")
    data_source = TextSource(backup_dir)
    manifest = flows.backup(ctx, data_source, BackupOptions(aof=True))
    assert data_source.seen == ["capture: lock backup redis, partials [], aof True", "finished: lock None"]
    sets = storage.list_sets(backup_dir, "redis")
    assert [s.id for s in sets] == [manifest.id] and sets[0].status == "ok"
    assert oct((backup_dir / "redis").stat().st_mode & 0o777) == oct(0o750)


def test_a_failed_capture_leaves_no_file_and_frees_the_lock(ctx: JobContext) -> None:
    backup_dir = ctx.config.backup_dir
    data_source = TextSource(backup_dir, fail=True)
    with pytest.raises(JobError, match="the server went away"):
        flows.backup(ctx, data_source, BackupOptions())
    assert data_source.seen[-1].startswith("capture: lock backup redis")  # finished never ran
    assert list((backup_dir / "redis").iterdir()) == []
    assert holder_of(backup_dir, "redis") is None
