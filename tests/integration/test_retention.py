"""Retention on crafted backup folders, through the real `kkua-backup` command line.

Each test builds a backup folder the way the tool writes it (real gzip data files, real manifests written
with storage.write_manifest, created_at in the past), adds what retention must leave alone (a corrupt
manifest, old scripts' files, notes.txt, symlinks, files outside the kind folders), runs
`python -m kkua_backupd prune|run retention` as a subprocess and checks exactly which files remain, the
exit code, the JSON report and the lines in log_dir/backup.log.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kkua_backupd.store.storage import (
    PREFIXES,
    Manifest,
    ManifestFile,
    base_manifest,
    now_local,
    write_manifest,
)
from kkua_backupd.stream.pipeline import write_atomic
from tests.support.helpers import describe

pytestmark = pytest.mark.timeout(120)

DAY = dt.timedelta(days=1)
EXT = {"postgres": [".sql.gz"], "redis": [".rdb.gz", "_memory.json.gz"]}


@dataclass
class BackupTree:
    """A crafted backup folder, its config, and what each test expects to go."""

    root: Path
    backup_dir: Path
    log_dir: Path
    config_path: Path
    outside: Path
    sets: dict[str, list[Path]] = field(default_factory=dict)  # label -> the set's files, manifest last
    doomed: set[str] = field(default_factory=set)  # labels a prune with days=7 deletes
    names: dict[str, str] = field(default_factory=dict)  # label -> the set's name (its main data file)

    def make_set(self, label: str, kind: str, age_days: float, *, set_type: str = "backup",
                 status: str = "ok") -> list[Path]:
        """Write one set (real gzip files, then its manifest) created `age_days` ago; returns its paths."""
        folder = self.backup_dir / kind
        folder.mkdir(parents=True, exist_ok=True, mode=0o750)
        created = now_local() - dt.timedelta(days=age_days)
        set_id = created.strftime("%Y%m%d_%H%M%S")
        prefix = PREFIXES[kind][set_type]
        files = []
        for ext in EXT[kind] if set_type == "backup" else EXT[kind][:1]:
            info = write_atomic(folder / f"{prefix}{set_id}{ext}", gzip.compress(f"{label} data\n".encode() * 50))
            files.append(ManifestFile(name=info.name, size=info.size, sha256=info.sha256, compression="gzip"))
        manifest = Manifest.model_validate({**base_manifest(kind, set_type, prefix, set_id, created),  # type: ignore[arg-type]
                                            "status": status, "files": files,
                                            "error": None if status == "ok" else "test restore failed"})
        paths = [folder / f.name for f in files] + [write_manifest(folder, manifest)]
        self.sets[label] = paths
        self.names[label] = files[0].name
        return paths

    def files(self) -> set[str]:
        """Every file and symlink under root, relative to root, except the tool's own bookkeeping (the log
        folder, lock files, the state file) and the config."""
        found = set()
        own = (self.log_dir, self.backup_dir / ".locks", self.backup_dir / ".state")
        for path in self.root.rglob("*"):
            if any(d in path.parents for d in own) or path == self.config_path \
                    or not (path.is_file() or path.is_symlink()):
                continue
            found.add(str(path.relative_to(self.root)))
        return found

    def rel(self, *labels: str) -> set[str]:
        return {str(p.relative_to(self.root)) for label in labels for p in self.sets[label]}

    def write_config(self, days: int = 7, keep_last: int = 3) -> None:
        self.config_path.write_text(f'backup_dir = "{self.backup_dir}"\nlog_dir = "{self.log_dir}"\n\n'
                                    f"[retention]\ndays = {days}\nkeep_last = {keep_last}\n"
                                    "safety_days = 30\nsafety_keep_last = 1\n")

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """`python -m kkua_backupd ARGS` with this tree's config; the guide's variables unset unless given."""
        full = {k: v for k, v in os.environ.items() if k not in ("BACKUP_RETENTION_DAYS", "JOURNAL_STREAM")}
        full["KKUA_BACKUP_CONFIG"] = str(self.config_path)
        full.update(env or {})
        return subprocess.run([sys.executable, "-m", "kkua_backupd", *args], capture_output=True, text=True,
                              env=full, timeout=60, stdin=subprocess.DEVNULL, check=False)

    def log(self) -> str:
        path = self.log_dir / "backup.log"
        return path.read_text() if path.exists() else ""




@pytest.fixture
def tree(tmp_path: Path) -> BackupTree:
    """postgres: good sets 1, 2, 3, 5 days old (kept), 10 and 20 (deleted); failed 0.5 (kept) and 12
    (deleted); one 15 days old whose data file is gone (deleted); safety 5 (kept) and 40 (deleted).
    redis: good 1, 9, 10 (kept, the newest three), 11 (deleted), failed 8 (deleted). Plus what must stay."""
    t = BackupTree(tmp_path, tmp_path / "backups", tmp_path / "logs", tmp_path / "config.toml",
                   tmp_path / "outside")
    t.write_config()
    for label, age in (("pg1", 1), ("pg2", 2), ("pg3", 3), ("pg5", 5), ("pg10", 10), ("pg20", 20)):
        t.make_set(label, "postgres", age)
    t.make_set("pg_failed_new", "postgres", 0.5, status="failed")
    t.make_set("pg_failed_old", "postgres", 12, status="failed")
    t.make_set("pg_incomplete", "postgres", 15)
    t.sets["pg_incomplete"][0].unlink()
    t.sets["pg_incomplete"] = t.sets["pg_incomplete"][1:]
    t.make_set("safety5", "postgres", 5, set_type="safety")
    t.make_set("safety40", "postgres", 40, set_type="safety")
    for label, age in (("rd1", 1), ("rd9", 9), ("rd10", 10), ("rd11", 11)):
        t.make_set(label, "redis", age)
    t.make_set("rd_failed", "redis", 8, status="failed")
    t.doomed = {"pg10", "pg20", "pg_failed_old", "pg_incomplete", "safety40", "rd11", "rd_failed"}

    pg = t.backup_dir / "postgres"
    # A 60-day-old set whose manifest is corrupt: neither it nor its data file may go.
    corrupt = t.make_set("corrupt", "postgres", 60)
    corrupt[-1].write_text('{"kind": "postgres", "id": ')
    # A 90-day-old set whose manifest names a file outside the folder.
    t.outside.mkdir()
    victim = t.outside / "precious.txt"
    victim.write_text("not yours\n")
    escape = t.make_set("escape", "postgres", 90)
    data = json.loads(escape[-1].read_text())
    data["files"].append({"name": "../../outside/precious.txt", "size": 10, "sha256": "0" * 64})
    escape[-1].write_text(json.dumps(data))
    # A 50-day-old set whose data file is a symlink to a file outside.
    linked = t.make_set("linked", "postgres", 50)
    linked_target = t.outside / "linked-target.sql.gz"
    linked[0].rename(linked_target)
    linked[0].symlink_to(linked_target)
    # The old scripts' backups (no manifest), an unrelated file, a stray symlink, partial files.
    (pg / "kkua_backup_20200101_020000.sql.gz").write_bytes(gzip.compress(b"legacy"))
    (t.backup_dir / "redis" / "redis_backup_20200101_030000.rdb.gz").write_bytes(gzip.compress(b"legacy"))
    (pg / "notes.txt").write_text("do not delete\n")
    (pg / "kkua_backup_20200202_020000.sql.gz").symlink_to(victim)
    stale = pg / "kkua_backup_20240101_020000.sql.gz.partial"
    stale.write_bytes(b"half a dump")
    two_days_ago = time.time() - 2 * 86400
    os.utime(stale, (two_days_ago, two_days_ago))
    (pg / "kkua_backup_29990101_020000.sql.gz.partial").write_bytes(b"being written")
    # Another folder in backup_dir with an old set: not a kind folder, never looked at.
    other = t.backup_dir / "postgres-old"
    other.mkdir()
    for path in t.sets["pg20"]:
        (other / path.name).write_bytes(path.read_bytes())
    return t


def expected_after_prune(t: BackupTree) -> set[str]:
    return expected_after_prune_from(t, t.files())


def expected_after_prune_from(t: BackupTree, before: set[str]) -> set[str]:
    stale = "backups/postgres/kkua_backup_20240101_020000.sql.gz.partial"
    return before - t.rel(*t.doomed) - {stale}


def report_names(report: dict[str, Any]) -> set[str]:
    return {item["name"] for item in report["deleted"]}


def doomed_names(t: BackupTree) -> set[str]:
    return {t.names[label] for label in t.doomed} | {"kkua_backup_20240101_020000.sql.gz.partial"}


def test_dry_run_lists_what_would_go_and_deletes_nothing(tree: BackupTree) -> None:
    before = tree.files()
    result = tree.run("prune", "--dry-run", "--json")
    assert result.returncode == 0, describe(result)
    report = json.loads(result.stdout)
    assert tree.files() == before
    assert report["dry_run"] is True
    assert report_names(report) == doomed_names(tree)
    assert report["freed_bytes"] == sum(item["bytes"] for item in report["deleted"]) > 0
    log = tree.log()
    assert re.search(r"would delete kkua_backup_\S+\.sql\.gz: 10 days( \d+ s)? old > 7 days; "
                     r"4 newer good sets kept", log), log
    assert "deleting " not in log
    # human output too
    human = tree.run("prune", "--dry-run")
    assert human.returncode == 0, describe(human)
    assert f"{len(tree.doomed)} set(s) would be deleted, 1 leftover partial file(s)" in human.stdout, human.stdout
    assert tree.files() == before


def test_prune_deletes_exactly_the_sets_past_retention(tree: BackupTree) -> None:
    expected = expected_after_prune(tree)
    rd11_bytes = sum(p.stat().st_size for p in tree.sets["rd11"])
    result = tree.run("prune", "--json")
    assert result.returncode == 0, describe(result)
    report = json.loads(result.stdout)
    assert tree.files() == expected
    assert (tree.outside / "precious.txt").read_text() == "not yours\n"
    assert report["dry_run"] is False
    assert report_names(report) == doomed_names(tree)
    by_name = {item["name"]: item for item in report["deleted"]}
    # every file of a set goes, the manifest listed last
    rd11 = by_name[tree.names["rd11"]]
    assert rd11["files"] == [p.name for p in tree.sets["rd11"]]
    assert rd11["files"][-1].endswith(".manifest.json")
    assert rd11["bytes"] == rd11_bytes
    assert report["freed_bytes"] == sum(item["bytes"] for item in report["deleted"])
    assert {item["name"] for item in report["kept"]} == {
        tree.names[label] for label in
        ("pg1", "pg2", "pg3", "pg5", "pg_failed_new", "safety5", "rd1", "rd9", "rd10")}
    skipped = {Path(item["path"]).name: item["reason"] for item in report["skipped"]}
    assert "manifest cannot be read" in skipped[tree.sets["corrupt"][-1].name]
    assert "'../../outside/precious.txt'" in skipped[tree.sets["escape"][-1].name]
    assert "symlink" in skipped[tree.sets["linked"][-1].name]
    assert "no manifest names this file" in skipped["kkua_backup_20200101_020000.sql.gz"]
    assert "no manifest names this file" in skipped["notes.txt"]
    assert "symlink" in skipped["kkua_backup_20200202_020000.sql.gz"]

    log = tree.log()
    for label in tree.doomed:
        assert f"deleting {tree.names[label]}: " in log, label
    assert re.search(r"deleting kkua_backup_\S+\.sql\.gz: 20 days( \d+ s)? old > 7 days; 4 newer good sets kept "
                     r"job=retention", log), log
    assert re.search(r"deleting kkua_backup_\S+\.sql\.gz: failed backup, 12 days( \d+ s)? old > 7 days; "
                     r"failed sets never count toward keep_last", log), log
    assert re.search(r"deleting safety_backup_before_restore_\S+: 40 days( \d+ s)? old > 30 days", log), log
    assert "deleting kkua_backup_20240101_020000.sql.gz.partial: leftover partial file" in log
    assert re.search(r"\[INFO\] retention finished .*deleted=8 kept=9 skipped=8 ", log), log

    # a second run finds nothing more to do
    again = tree.run("prune", "--json")
    assert again.returncode == 0, describe(again)
    assert json.loads(again.stdout)["deleted"] == []
    assert tree.files() == expected


def test_run_retention_is_the_same_job_and_records_its_run(tree: BackupTree) -> None:
    expected = expected_after_prune(tree)
    result = tree.run("run", "retention")
    assert result.returncode == 0, describe(result)
    assert tree.files() == expected
    assert "deleting " in tree.log()
    status = tree.run("status", "--json")
    assert status.returncode == 0, describe(status)
    retention = json.loads(status.stdout)["jobs"]["retention"]
    assert retention["last_result"] == "ok", retention


def test_backup_retention_days_in_the_environment_overrides_the_file(tree: BackupTree) -> None:
    before = tree.files()
    result = tree.run("prune", "--json", env={"BACKUP_RETENTION_DAYS": "30"})
    assert result.returncode == 0, describe(result)
    report = json.loads(result.stdout)
    # only what is older than 30 days goes: the 40-day safety backup (its own 30-day rule) and the partial
    assert report_names(report) == {tree.names["safety40"], "kkua_backup_20240101_020000.sql.gz.partial"}
    assert tree.files() == before - tree.rel("safety40") - {
        "backups/postgres/kkua_backup_20240101_020000.sql.gz.partial"}
    assert "days=30" in tree.log()

    shorter = tree.run("prune", "--json", env={"BACKUP_RETENTION_DAYS": "4"})
    assert shorter.returncode == 0, describe(shorter)
    gone = report_names(json.loads(shorter.stdout))
    assert tree.names["pg5"] in gone  # 5 days old > 4, with 3 newer good sets kept
    assert tree.names["rd9"] not in gone  # one of the newest 3 good redis sets


HOLD = """
import sys
from pathlib import Path
from kkua_backupd.store.lock import TargetLock
lock = TargetLock(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
lock.acquire()
print("held", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def lock_held(backup_dir: Path, target: str, purpose: str) -> Iterator[int]:
    """Another process holds `target`'s lock (as a running backup would); yields its pid."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(backup_dir), target, purpose],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.kill()  # like kill -9: the kernel drops the flock
        proc.wait(timeout=10)


@pytest.fixture
def postgres_lock_held(tree: BackupTree) -> Iterator[int]:
    with lock_held(tree.backup_dir, "postgres", "backup postgres") as pid:
        yield pid


def test_a_second_prune_while_one_runs_is_refused(tree: BackupTree) -> None:
    before = tree.files()
    with lock_held(tree.backup_dir, "retention", "retention") as pid:
        result = tree.run("prune", "--json")
        assert result.returncode == 3, describe(result)
        error = json.loads(result.stdout)
        assert error["type"] == "LockHeld"
        assert f"another run holds the retention lock (pid {pid}" in error["error"]
        assert tree.files() == before
        dry = tree.run("prune", "--dry-run", "--json")  # a dry run takes no lock
        assert dry.returncode == 0, describe(dry)
        assert report_names(json.loads(dry.stdout)) == doomed_names(tree)
    assert tree.files() == before
    after = tree.run("prune", "--json")
    assert after.returncode == 0, describe(after)
    assert tree.files() == expected_after_prune_from(tree, before)


def test_no_backup_folder_yet_is_not_an_error(tmp_path: Path) -> None:
    t = BackupTree(tmp_path, tmp_path / "backups", tmp_path / "logs", tmp_path / "config.toml", tmp_path / "x")
    t.write_config()
    result = t.run("prune", "--json")
    assert result.returncode == 0, describe(result)
    assert json.loads(result.stdout) == {"deleted": [], "kept": [], "skipped": [], "freed_bytes": 0,
                                         "dry_run": False}
    assert not t.backup_dir.exists()


def test_a_held_lock_skips_that_kind_only(tree: BackupTree, postgres_lock_held: int) -> None:
    before = tree.files()
    result = tree.run("prune", "--json")
    assert result.returncode == 0, describe(result)
    report = json.loads(result.stdout)
    assert report_names(report) == {tree.names["rd11"], tree.names["rd_failed"]}
    assert tree.files() == before - tree.rel("rd11", "rd_failed")
    skipped = {item["path"]: item["reason"] for item in report["skipped"]}
    reason = skipped[str(tree.backup_dir / "postgres")]
    assert f"pid {postgres_lock_held}" in reason
    assert "postgres not pruned this time" in reason
    assert re.search(rf"WARNING\] postgres not pruned this time: another run holds the postgres lock "
                     rf"\(pid {postgres_lock_held}, 'backup postgres'", tree.log()), tree.log()

    dry = tree.run("prune", "--dry-run", "--json")
    assert dry.returncode == 0, describe(dry)
    dry_report = json.loads(dry.stdout)
    assert any("a real prune would skip postgres" in item["reason"] for item in dry_report["skipped"])
    assert tree.files() == before - tree.rel("rd11", "rd_failed")


def test_an_interrupted_prune_leaves_a_set_that_shows_incomplete_and_is_finished_next_time(
        tree: BackupTree) -> None:
    # What a prune killed between the data file and the manifest leaves behind.
    tree.sets["pg10"][0].unlink()
    listed = tree.run("list", "postgres", "--json")
    assert listed.returncode == 0, describe(listed)
    statuses = {item["id"]: item["status"] for item in json.loads(listed.stdout)}
    pg10_id = tree.sets["pg10"][-1].name.removeprefix("kkua_backup_").removesuffix(".manifest.json")
    assert statuses[pg10_id] == "incomplete"
    result = tree.run("prune", "--json")
    assert result.returncode == 0, describe(result)
    item = next(i for i in json.loads(result.stdout)["deleted"] if i["id"] == pg10_id)
    assert item["reason"].startswith("incomplete backup, 10 days")
    assert not tree.sets["pg10"][-1].exists()


def test_damaged_and_failed_newest_sets_make_an_older_good_one_stay(tree: BackupTree) -> None:
    # The two newest postgres backups were cut short on disk (sizes no longer match their manifests)
    # and the newest of all failed: the newest good ones are now 3, 5 and 10 days old, so the 10-day-old
    # set must stay even though it is past `days`.
    for label in ("pg1", "pg2"):
        data = tree.sets[label][0]
        data.write_bytes(data.read_bytes()[:20])
    before = tree.files()
    result = tree.run("prune", "--json")
    assert result.returncode == 0, describe(result)
    report = json.loads(result.stdout)
    kept = {item["name"]: item for item in report["kept"]}
    assert kept[tree.names["pg10"]]["reason"].startswith("one of the newest 3 good postgres backups (10 days")
    assert kept[tree.names["pg1"]]["status"] == "damaged"
    assert kept[tree.names["pg1"]]["reason"] == "damaged backup, 1 day old <= 7 days"
    assert tree.names["pg10"] not in report_names(report)
    assert tree.files() == before - tree.rel(*(tree.doomed - {"pg10"})) - {
        "backups/postgres/kkua_backup_20240101_020000.sql.gz.partial"}
    assert re.search(r"deleting kkua_backup_\S+: 20 days old > 7 days; 3 newer good sets kept", tree.log())


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """`folder` bind-mounted read-only onto itself (skips where mounting is not allowed)."""
    bound = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True, text=True,
                           check=False)
    if bound.returncode != 0:
        pytest.skip(f"cannot bind-mount here (needs root with CAP_SYS_ADMIN): {bound.stderr.strip()}")
    try:
        ro = subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True, text=True,
                            check=False)
        if ro.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {ro.stderr.strip()}")
        yield
    finally:
        if subprocess.run(["umount", str(folder)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_file_that_cannot_be_deleted_fails_the_run_after_the_rest_is_done(tree: BackupTree) -> None:
    before = tree.files()
    with read_only(tree.backup_dir / "postgres"):
        result = tree.run("prune", "--json")
    assert result.returncode == 1, describe(result)
    error = json.loads(result.stdout)
    assert error["type"] == "StorageError"
    assert re.match(r"retention could not delete \d+ file\(s\), first: cannot delete \S+/backups/postgres/"
                    r"\S+: Read-only file system; fix the folder's owner or mode", error["error"]), error
    # postgres: nothing lost, every set still has its manifest; redis: pruned as usual
    assert tree.files() == before - tree.rel("rd11", "rd_failed")
    log = tree.log()
    assert re.search(r"\[ERROR\] cannot delete \S+kkua_backup_\S+\.sql\.gz: Read-only file system; check the "
                     r"folder's owner and mode", log), log
    assert f"deleting {tree.names['rd11']}: " in log
