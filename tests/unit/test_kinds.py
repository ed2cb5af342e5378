"""The one registry of kinds (kkua_backupd.sources) agrees with the backup folder and names real jobs."""

from __future__ import annotations

from pathlib import Path

from kkua_backupd import sources
from kkua_backupd.config import Config
from kkua_backupd.store import storage


def test_registry_is_the_folders_kinds_plus_retention() -> None:
    assert sources.KINDS == storage.KINDS == tuple(storage.PREFIXES)
    assert (*storage.KINDS, "retention") == sources.JOBS
    assert (*storage.KINDS, "all") == sources.BACKUP_TARGETS
    assert (*sources.JOBS, "all") == sources.RUN_JOBS


def test_every_kind_has_a_source_that_backs_up_and_verifies() -> None:
    assert tuple(sources.JOB_MODULES) == tuple(sources.REGISTRY) == sources.KINDS
    for kind in sources.KINDS:
        source = sources.source(kind)
        assert source is sources.job_module(kind).SOURCE
        assert source.kind == kind
        assert callable(source.capture) and callable(source.finished) and callable(source.verify_set)


def test_each_job_names_its_target_in_the_log(tmp_path: Path) -> None:
    config = Config.model_validate({"backup_dir": str(tmp_path / "b"), "log_dir": str(tmp_path / "l"),
                                    "postgres": {"host": "db", "port": 5433, "database": "kkua"},
                                    "redis": {"host": "cache", "port": 6380}})
    assert sources.job_target(config, "postgres") == "db:5433/kkua"
    assert sources.job_target(config, "redis") == "cache:6380"
    assert sources.job_target(config, sources.RETENTION) == str(tmp_path / "b")
