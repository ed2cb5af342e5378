"""The PostgreSQL data source of the flows: pg_dump sets with the row counts of the same snapshot,
restores in one transaction, and test restores that prove them.
"""

from __future__ import annotations

import time
from pathlib import Path

from kkua_backupd.core.context import (
    JobContext,
    VerifyReport,
)
from kkua_backupd.errors import (
    JobError,
)
from kkua_backupd.obs.progress import human_bytes
from kkua_backupd.sources import BackupOptions, RestoreOptions
from kkua_backupd.sources.postgres.backup import dump, manifest_files, manifest_for
from kkua_backupd.sources.postgres.client import KIND
from kkua_backupd.sources.postgres.load import drop_unfinished_databases
from kkua_backupd.sources.postgres.manifest import PostgresDetails
from kkua_backupd.sources.postgres.restore import PostgresRestore
from kkua_backupd.sources.postgres.verify import test_restore_file, verify_set
from kkua_backupd.store.signing import sign
from kkua_backupd.store.storage import (
    PREFIXES,
    BackupSet,
    Kind,
    Manifest,
    write_manifest,
)


class PostgresSource:
    """The PostgreSQL data source of the flows (core/flows.py): a pg_dump set, its row counts, and a test
    restore when asked."""

    kind: Kind = KIND

    def capture(self, ctx: JobContext, folder: Path, options: BackupOptions, started: float) -> Manifest:
        """Dump the configured database into `folder` (and test-restore it if asked) and write its manifest;
        a failed test restore still writes the set, marked failed (`finished` raises for it)."""
        pg = ctx.config.postgres
        want_test = pg.test_restore if options.test_restore is None else options.test_restore
        drop_unfinished_databases(ctx, lock_held=True)
        prefix = PREFIXES[KIND]["backup"]
        result = dump(ctx, folder, prefix=prefix, fmt=pg.format, compression=pg.compression,
                      dbname=pg.database, checksums=want_test)
        test_restore = None
        status, error = "ok", None
        if result.problems:
            status, error = "failed", f"dump would not restore: {result.problems[0]}"
        elif want_test:
            written = manifest_files(result)
            outcome = test_restore_file(ctx, folder / result.file.name, result.fmt, result.compression,
                                         set_id=result.set_id, expected=result.tables, expected_file=written[0],
                                         objects=result.objects, members=written)
            test_restore = outcome
            if outcome.ran and not outcome.ok:
                status, error = "failed", f"test restore failed: {outcome.error}"
        manifest = manifest_for(result, set_type="backup", prefix=prefix, dbname=pg.database, status=status,
                                 error=error, test_restore=test_restore, total_seconds=time.monotonic() - started)
        manifest = sign(manifest, ctx.keys.signing_key)
        write_manifest(folder, manifest)
        return manifest

    def finished(self, ctx: JobContext, manifest: Manifest, started: float) -> None:
        """Raises JobError when the set is marked failed, or ok but unverified (its test restore could not
        run); else logs the backup's end."""
        file = manifest.files[0]
        test = manifest.details_as(PostgresDetails).tested
        if test is not None and not test.ok and not test.ran:
            ctx.log.error("backup is ok but unverified: its test restore could not run", file=file.name,
                          reason=test.error)
            raise JobError(f"backup {file.name} is ok but unverified: its test restore could not run: "
                           f"{test.error}", hint="the set stays usable; fix the cause, then run `kkua-backup "
                                                    f"verify {manifest.id} --restore-test`")
        if manifest.status != "ok":
            ctx.log.error("backup marked failed", file=file.name, reason=manifest.error)
            raise JobError(f"backup {file.name} was written but its {manifest.error}",
                           hint="the set is marked failed and is never used by `restore latest`")
        stored = sum(f.size for f in manifest.files)
        ctx.log.info("backup finished", file=file.name, id=manifest.id, bytes=stored, size=human_bytes(stored),
                     seconds=round(time.monotonic() - started, 2),
                     sha256=file.sha256, test_restore="passed" if test is not None else "skipped")

    def verify_set(self, ctx: JobContext, backup_set: BackupSet, *, restore_test: bool) -> VerifyReport:
        return verify_set(ctx, backup_set, restore_test=restore_test)

    def restorer(self, ctx: JobContext, spec: str, options: RestoreOptions) -> PostgresRestore:
        return PostgresRestore(ctx, spec, options)


SOURCE = PostgresSource()
