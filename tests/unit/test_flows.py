"""The flows written once (core/flows.py), with a small data source of its own that writes a real set
through the byte chain and restores it into a file: the backup flow makes the folder, removes partial files
of killed runs, holds the kind's lock only while the source captures, and leaves nothing behind when the
capture fails; the restore flow runs the source's steps in one order under the lock, asks before it
replaces data, takes the safety backup only after that, and fails a result that differs from the backup."""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kkua_backupd.config import Config
from kkua_backupd.core import flows
from kkua_backupd.core.context import JobContext, RestorePlan, RestoreReport, SafetyBackup, VerifyReport
from kkua_backupd.errors import JobError, NotConfirmed, Refused
from kkua_backupd.obs import logs
from kkua_backupd.sources import BackupOptions, RestoreOptions
from kkua_backupd.store import storage
from kkua_backupd.store.lock import holder_of
from kkua_backupd.store.storage import BackupSet, Kind, Manifest, ManifestFile
from kkua_backupd.stream.chain import open_chain, read_chain


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

    def restorer(self, ctx: JobContext, spec: str, options: RestoreOptions) -> TextRestore:
        return TextRestore(self, ctx, spec, options)


class TextRestore:
    """The restore of a TextSource set into a file (its "server"); every step notes itself and who holds the
    kind's lock, so the test sees the order the flow runs them in."""

    checks = "a decompress test"

    def __init__(self, source: TextSource, ctx: JobContext, spec: str, options: RestoreOptions) -> None:
        self.source, self.ctx, self.options = source, ctx, options
        self.backup_set = storage.resolve(ctx.config.backup_dir, source.kind, spec)
        self.name = self.backup_set.name
        self.server = ctx.config.backup_dir.parent / "server.data"
        self.target = str(self.server)
        self.requested: dict[str, Any] = {"server": self.target}
        self.target_field: dict[str, Any] = {"server": self.target}
        self.report = RestoreReport(kind=source.kind, file=self.name, id=self.backup_set.id)
        self.fail_at = ""
        self.differs = False

    def _step(self, name: str) -> None:
        holder = holder_of(self.source.backup_dir, self.source.kind)
        self.source.seen.append(f"{name}: lock {holder and holder.get('purpose')}")
        if name == self.fail_at:
            raise JobError(f"{name} failed")

    def prepare(self) -> None:
        self._step("prepare")

    def check(self) -> None:
        self._step("check")

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        self._step("session")
        try:
            yield
        finally:
            self._step("session closed")

    def plan(self) -> RestorePlan:
        self._step("plan")
        return RestorePlan(self.backup_set, self.target, in_place=True, target_exists=self.server.exists(),
                           safety=self.options.safety_backup and self.server.exists(), lines=["Restore it"])

    def safety_backup(self) -> SafetyBackup:
        self._step("safety_backup")
        kept = self.server.with_name("safety.data")
        kept.write_bytes(self.server.read_bytes())
        return SafetyBackup(file=kept.name, size=kept.stat().st_size, sha256="0" * 64)

    def apply(self) -> None:
        self._step("apply")
        self.server.write_bytes(b"".join(read_chain(self.backup_set.path(), "gzip")))

    def counts_after(self) -> list[str]:
        self._step("counts_after")
        return ["db0: 3 keys, the backup has 4"] if self.differs else []

    def undo_hint(self) -> str:
        return "the data from before is in safety.data"

    def finished(self) -> None:
        self._step("finished")


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


RESTORE_STEPS = ["prepare", "check", "session", "plan", "safety_backup", "apply", "session closed", "counts_after"]


def _restored(ctx: JobContext, options: RestoreOptions, **setup: Any) -> tuple[TextSource, TextRestore]:
    """A TextSource with one set, and its restore as the flow will run it (`setup`: fail_at, differs)."""
    data_source = TextSource(ctx.config.backup_dir)
    manifest = flows.backup(ctx, data_source, BackupOptions())
    data_source.seen.clear()
    run = data_source.restorer(ctx, manifest.id, options)
    for key, value in setup.items():
        setattr(run, key, value)
    data_source.restorer = lambda *_args: run  # type: ignore[method-assign]
    return data_source, run


def test_a_restore_runs_the_sources_steps_in_one_order_under_the_lock(ctx: JobContext) -> None:
    data_source, run = _restored(ctx, RestoreOptions(force=True))
    run.server.write_bytes(b"what the server held")
    report = flows.restore(ctx, data_source, "latest", RestoreOptions(force=True))
    lock = f"lock restore redis {run.name}"
    assert data_source.seen == [*(f"{step}: {lock}" for step in RESTORE_STEPS), "finished: lock None"]
    assert run.server.read_bytes() == b"REDIS0011" + b"x" * 100_000
    assert run.server.with_name("safety.data").read_bytes() == b"what the server held"
    assert report.safety_backup is not None and report.safety_backup.file == "safety.data"
    assert isinstance(report.seconds, float)
    assert report.to_json() == {"kind": "redis", "file": run.name, "id": run.backup_set.id,
                                "safety_backup": {"file": "safety.data", "size": 20, "sha256": "0" * 64},
                                "seconds": report.seconds}


def test_no_answer_changes_nothing_and_the_safety_backup_comes_after_the_question(
        ctx: JobContext, monkeypatch: pytest.MonkeyPatch) -> None:
    data_source, run = _restored(ctx, RestoreOptions())
    run.server.write_bytes(b"what the server held")
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # nobody at a terminal
    with pytest.raises(NotConfirmed, match="no terminal to ask") as raised:
        flows.restore(ctx, data_source, "latest", RestoreOptions())
    assert raised.value.exit_code == NotConfirmed.exit_code
    assert [line.split(":")[0] for line in data_source.seen] == ["prepare", "check", "session", "plan",
                                                                 "session closed"]
    assert run.server.read_bytes() == b"what the server held"
    assert not run.server.with_name("safety.data").exists()
    assert holder_of(ctx.config.backup_dir, "redis") is None


def test_a_new_target_is_not_asked_about_and_no_safety_backup_is_taken(ctx: JobContext) -> None:
    data_source, run = _restored(ctx, RestoreOptions())
    flows.restore(ctx, data_source, "latest", RestoreOptions())  # nothing to replace: no question
    assert "safety_backup" not in [line.split(":")[0] for line in data_source.seen]
    assert run.server.read_bytes().startswith(b"REDIS0011")


def test_a_result_that_differs_fails_with_exit_1_and_says_where_the_data_from_before_is(ctx: JobContext) -> None:
    data_source, run = _restored(ctx, RestoreOptions(force=True), differs=True)
    run.server.write_bytes(b"what the server held")
    with pytest.raises(JobError) as raised:
        flows.restore(ctx, data_source, "latest", RestoreOptions(force=True))
    assert raised.value.exit_code == 1
    assert raised.value.message == (f"restore of {run.name} into {run.target} finished, but the result differs "
                                    "from the backup: db0: 3 keys, the backup has 4")
    assert raised.value.hint == "the data from before is in safety.data"
    assert data_source.seen[-1].startswith("counts_after")  # no "restore finished"
    assert holder_of(ctx.config.backup_dir, "redis") is None


@pytest.mark.parametrize("step", ["prepare", "check", "plan", "safety_backup", "apply"])
def test_a_step_that_fails_stops_the_restore_there_and_frees_the_lock(ctx: JobContext, step: str) -> None:
    data_source, run = _restored(ctx, RestoreOptions(force=True), fail_at=step)
    run.server.write_bytes(b"what the server held")
    with pytest.raises(JobError, match=f"{step} failed"):
        flows.restore(ctx, data_source, "latest", RestoreOptions(force=True))
    done = [line.split(":")[0] for line in data_source.seen]
    assert done[:done.index(step) + 1] == RESTORE_STEPS[:RESTORE_STEPS.index(step) + 1]
    assert ("session" in done) == ("session closed" in done)  # what the session opened is closed
    assert "counts_after" not in done
    if step != "apply":
        assert run.server.read_bytes() == b"what the server held"
    assert holder_of(ctx.config.backup_dir, "redis") is None


def test_an_invalid_set_is_refused_before_the_sources_check(ctx: JobContext) -> None:
    data_source, _run = _restored(ctx, RestoreOptions(force=True))
    (ctx.config.backup_dir / "redis").chmod(0o777)  # writable by anyone: what is in it can't be trusted
    try:
        with pytest.raises(Refused, match="restore refused"):
            flows.restore(ctx, data_source, "latest", RestoreOptions(force=True))
    finally:
        (ctx.config.backup_dir / "redis").chmod(0o750)
    assert [line.split(":")[0] for line in data_source.seen] == ["prepare"]
