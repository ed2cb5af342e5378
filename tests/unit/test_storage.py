"""Backup folder rules: names, manifests, what exists for list/restore latest, and path safety."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kkua_backupd.errors import StorageError, UsageError
from kkua_backupd.store import storage
from kkua_backupd.stream.pipeline import write_atomic


def make_set(folder: Path, set_id: str, *, set_type: str = "backup", status: str = "ok",
             with_manifest: bool = True) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    prefix = storage.PREFIXES["postgres"][set_type]
    name = f"{prefix}{set_id}.sql.gz"
    info = write_atomic(folder / name, b"data " + set_id.encode())
    if with_manifest:
        created = dt.datetime.strptime(set_id, storage.ID_FORMAT).replace(tzinfo=dt.UTC)
        data = storage.base_manifest("postgres", set_type, prefix, set_id, created)
        data.update(status=status, files=[{"name": name, "size": info.size, "sha256": info.sha256}])
        storage.write_manifest(folder, storage.Manifest.model_validate(data))
    return name


def test_data_file_names_follow_the_guide() -> None:
    assert storage.data_file_name("kkua_backup_", "20240115_020000", ".sql", "gzip") == \
        "kkua_backup_20240115_020000.sql.gz"
    assert storage.data_file_name("kkua_backup_", "20240115_020000", ".dump", "zstd") == \
        "kkua_backup_20240115_020000.dump.zst"
    assert storage.data_file_name("kkua_backup_", "20240115_020000", ".sql", "none") == \
        "kkua_backup_20240115_020000.sql"


def test_list_is_newest_first_and_ignores_incomplete_sets(tmp_path: Path) -> None:
    folder = tmp_path / "postgres"
    make_set(folder, "20240114_020000")
    make_set(folder, "20240115_020000")
    make_set(folder, "20240116_020000", with_manifest=False)  # died before its manifest
    (folder / "kkua_backup_20240117_020000.sql.gz.partial").write_bytes(b"half")
    (folder / "kkua_backup_20240113_020000.manifest.json").write_text("{not json")
    ids = [s.id for s in storage.list_sets(tmp_path)]
    assert ids == ["20240115_020000", "20240114_020000"]


def test_latest_skips_safety_and_failed_sets(tmp_path: Path) -> None:
    folder = tmp_path / "postgres"
    make_set(folder, "20240114_020000")
    make_set(folder, "20240115_020000", status="failed")
    make_set(folder, "20240116_020000", set_type="safety")
    found = storage.latest(tmp_path, "postgres")
    assert found is not None
    assert found.id == "20240114_020000"


def test_a_set_with_a_missing_file_is_incomplete(tmp_path: Path) -> None:
    folder = tmp_path / "postgres"
    name = make_set(folder, "20240114_020000")
    (folder / name).unlink()
    assert storage.list_sets(tmp_path)[0].status == "incomplete"
    assert storage.latest(tmp_path, "postgres") is None


@pytest.mark.parametrize("spec", ["../../etc/passwd", "/etc/passwd", "postgres/../../x", "..",
                                  "sub/kkua_backup_20240114_020000.sql.gz"])
def test_resolve_refuses_paths_outside_the_folder(tmp_path: Path, spec: str) -> None:
    make_set(tmp_path / "postgres", "20240114_020000")
    with pytest.raises(UsageError, match="refusing"):
        storage.resolve(tmp_path, "postgres", spec)


def test_resolve_by_latest_id_name_and_inside_path(tmp_path: Path) -> None:
    folder = tmp_path / "postgres"
    name = make_set(folder, "20240114_020000")
    for spec in ("latest", "20240114_020000", name, str(folder / name)):
        assert storage.resolve(tmp_path, "postgres", spec).name == name


def test_resolve_a_file_without_manifest_is_unverified(tmp_path: Path) -> None:
    folder = tmp_path / "postgres"
    name = make_set(folder, "20240116_020000", with_manifest=False)
    found = storage.resolve(tmp_path, "postgres", name)
    assert found.manifest is None
    assert found.status == "unverified"


def test_resolve_unknown_name(tmp_path: Path) -> None:
    (tmp_path / "postgres").mkdir()
    with pytest.raises(UsageError, match="not a backup"):
        storage.resolve(tmp_path, "postgres", "kkua_backup_19990101_000000.sql.gz")
    with pytest.raises(UsageError, match="no complete postgres backup"):
        storage.resolve(tmp_path, "postgres", "latest")


def test_new_set_id_never_reuses_a_name(tmp_path: Path) -> None:
    fixed = dt.datetime(2024, 1, 15, 2, 0, 0, tzinfo=dt.UTC)
    later = fixed + dt.timedelta(seconds=1)
    times = iter([fixed, later])
    (tmp_path / "kkua_backup_20240115_020000.sql.gz").write_bytes(b"")
    set_id, created = storage.new_set_id(tmp_path, "kkua_backup_", clock=lambda: next(times))
    assert set_id == "20240115_020001"
    assert created == later


def test_stale_partials_are_removed_but_nothing_else(tmp_path: Path) -> None:
    (tmp_path / "kkua_backup_20240115_020000.sql.gz.partial").write_bytes(b"x")
    (tmp_path / "kkua_backup_20240114_020000.sql.gz").write_bytes(b"x")  # e.g. made by the old scripts
    (tmp_path / "notes.partial").write_bytes(b"mine")  # not ours
    assert storage.remove_stale_partials(tmp_path) == ["kkua_backup_20240115_020000.sql.gz.partial"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kkua_backup_20240114_020000.sql.gz", "notes.partial"]


def test_scratch_folders_and_orphan_directory_files_of_killed_runs_are_removed(tmp_path: Path) -> None:
    folder = tmp_path / "postgres"
    folder.mkdir()
    scratch = folder / "kkua_scratch_20240115_020000_4242.partial"
    (scratch / "dump").mkdir(parents=True)
    (scratch / "dump" / "toc.dat").write_bytes(b"x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"x")
    (scratch / "link").symlink_to(outside)  # never followed
    (folder / "kkua_scratch_20240115_020001_1.partial").symlink_to(outside)  # a symlink: left alone
    orphan = "kkua_backup_20240115_020000.pgdir.3456.dat.gz"
    (folder / orphan).write_bytes(b"x")
    kept = ["kkua_backup_20240116_020000.pgdir.toc.dat.gz", "kkua_backup_20240116_020000.manifest.json",
            "kkua_backup_20240116_020000.sql.gz", "kkua_backup_20240117_020000.sql.gz", "kkua_scratch_notes"]
    for name in kept:
        (folder / name).write_bytes(b"x")
    # a live run's scratch folder (a `verify` unpacks without the lock): its pid is a kkua process
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "kkua-backup"])
    try:
        live_scratch = folder / f"kkua_scratch_20240115_020002_{live.pid}.partial"
        live_scratch.mkdir()
        removed = storage.remove_stale_partials(folder)
    finally:
        live.kill()
        live.wait()
    assert removed == [orphan, "kkua_scratch_20240115_020000_4242.partial/"]
    assert (outside / "keep").exists()
    assert sorted(p.name for p in folder.iterdir()) == sorted([*kept, "kkua_scratch_20240115_020001_1.partial",
                                                               live_scratch.name])
    assert storage.remove_stale_partials(folder) == [f"{live_scratch.name}/"]  # once that run is gone


def test_scratch_folder_is_private_and_gone_on_every_exit(tmp_path: Path) -> None:
    with storage.scratch_folder(tmp_path) as scratch:
        assert storage.own_scratch_folder(scratch.name)
        assert oct(scratch.stat().st_mode & 0o777) == oct(0o700)
        (scratch / "sub").mkdir()
        (scratch / "sub" / "f").write_bytes(b"x")
    assert not scratch.exists()
    with pytest.raises(RuntimeError), storage.scratch_folder(tmp_path) as scratch:
        raise RuntimeError("boom")
    assert not scratch.exists()
    with storage.scratch_folder(tmp_path) as first, storage.scratch_folder(tmp_path) as second:
        assert first != second and first.is_dir() and second.is_dir()
    assert list(tmp_path.iterdir()) == []


def test_move_into_never_replaces_a_file(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "a").write_bytes(b"new")
    (src / "b").write_bytes(b"new")
    (dst / "b").write_bytes(b"old")
    with pytest.raises(StorageError, match="exists already"):
        storage.move_into(src, dst, ["a", "b"])
    assert (dst / "b").read_bytes() == b"old"
    (dst / "b").unlink()
    storage.move_into(src, dst, ["b"])
    assert (dst / "b").read_bytes() == b"new"


def test_manifest_json_has_the_list_contract_fields(tmp_path: Path) -> None:
    make_set(tmp_path / "postgres", "20240114_020000")
    doc = json.loads(json.dumps(storage.list_sets(tmp_path)[0].to_json()))
    for key in ("kind", "id", "created_at", "status", "files"):
        assert key in doc
    assert set(doc["files"][0]) >= {"name", "size", "sha256"}
    assert dt.datetime.fromisoformat(doc["created_at"]).tzinfo is not None


def test_unmanaged_files_are_named_for_the_operator(tmp_path: Path) -> None:
    folder = tmp_path / "postgres"
    make_set(folder, "20240114_020000")
    legacy = make_set(folder, "20240101_020000", with_manifest=False)
    (folder / "kkua_backup_20240115_020000.sql.gz.partial").write_bytes(b"x")
    assert storage.unmanaged_files(tmp_path, "postgres") == [legacy]
