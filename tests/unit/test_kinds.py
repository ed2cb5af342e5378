"""The one registry of kinds (kkua_backupd.sources) agrees with the backup folder and names real jobs."""

from __future__ import annotations

from kkua_backupd import sources
from kkua_backupd.store import storage


def test_registry_is_the_folders_kinds_plus_retention() -> None:
    assert sources.KINDS == storage.KINDS == tuple(storage.PREFIXES)
    assert (*storage.KINDS, "retention") == sources.JOBS
    assert (*storage.KINDS, "all") == sources.BACKUP_TARGETS
    assert (*sources.JOBS, "all") == sources.RUN_JOBS


def test_every_kind_has_a_module_that_backs_up_and_verifies() -> None:
    assert tuple(sources.JOB_MODULES) == sources.KINDS
    for kind in sources.KINDS:
        module = sources.job_module(kind)
        assert callable(module.backup) and callable(module.verify_set)
