"""Start-up: a command imports what it uses, no more (issue 14; docs/performance.md, start-up). Each case runs
the CLI's entry point in a fresh interpreter and lists the heavy libraries it loaded; no time is asserted
(the machine's load decides those), only which modules were imported, so a stray top-level import in any
module on a command's path fails here instead of slowing every timer run unnoticed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The libraries that cost start-up time (pydantic ~0.08 s with our models, psycopg ~0.1 s, redis-py ~0.09 s,
# structlog ~0.03 s, prometheus_client ~0.04 s, ...), and the package's modules that pull them in.
HEAVY = ("pydantic", "pydantic_core", "psycopg", "redis", "structlog", "zstandard", "isal", "obstore", "pyrage",
         "prometheus_client", "anycrc", "kkua_backupd.config", "kkua_backupd.core", "kkua_backupd.store.storage",
         "kkua_backupd.sources.postgres", "kkua_backupd.sources.redis", "kkua_backupd.remote",
         "kkua_backupd.install", "kkua_backupd.daemon")

# Runs in the child: the console script's entry point (kkua_backupd.cli:run), then what it imported.
PROBE = r"""
import json, sys
out, argv = sys.argv[1], sys.argv[2:]
code = None
try:
    from kkua_backupd.cli import main
    code = main(argv)
except SystemExit as exc:
    code = exc.code
finally:
    with open(out, "w") as fh:
        json.dump({"code": code, "modules": sorted(sys.modules)}, fh)
"""


def loaded(tmp_path: Path, *argv: str) -> tuple[object, set[str]]:
    """Run `kkua-backup ARGV` in a new interpreter; its exit code and the names of the modules it imported."""
    out = tmp_path / "modules.json"
    env = {k: v for k, v in os.environ.items() if k not in ("KKUA_BACKUP_CONFIG", "JOURNAL_STREAM")}
    env["PYTHONPATH"] = str(ROOT)
    subprocess.run([sys.executable, "-c", PROBE, str(out), *argv], env=env, cwd=tmp_path, capture_output=True,
                   timeout=120, check=False)
    doc = json.loads(out.read_text())
    return doc["code"], set(doc["modules"])


def heavy_in(modules: set[str], allowed: tuple[str, ...] = ()) -> list[str]:
    """The heavy modules in `modules` (a name of HEAVY or below it), except the `allowed` ones (a name, or
    below it; a name ending in "." allows that module alone)."""
    def allowed_here(module: str) -> bool:
        return any(module == a.rstrip(".") or (not a.endswith(".") and module.startswith(a + "."))
                   for a in allowed)

    return sorted(module for module in modules
                  if any(module == name or module.startswith(name + ".") for name in HEAVY)
                  and not allowed_here(module))


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["backup", "--help"], ["restore", "nothing"],
                                  ["no-such-command"], ["status", "--no-such-option"]],
                         ids=["help", "version", "backup-help", "bad-target", "bad-command", "bad-option"])
def test_help_version_and_usage_errors_import_nothing_heavy(tmp_path: Path, argv: list[str]) -> None:
    code, modules = loaded(tmp_path, *argv)
    assert code == (0 if "--help" in argv or "--version" in argv else 2)
    assert "kkua_backupd.cli" in modules and "argparse" in modules  # the probe did run the CLI
    assert heavy_in(modules) == []


@pytest.fixture
def config(tmp_path: Path) -> Path:
    backup_dir, log_dir = tmp_path / "backups", tmp_path / "logs"
    for folder in (backup_dir, log_dir):
        folder.mkdir(mode=0o750)
    path = tmp_path / "config.toml"
    path.write_text(f'backup_dir = "{backup_dir}"\nlog_dir = "{log_dir}"\n')
    return path


# What `status` needs: the validated config (pydantic: the floor, see docs/performance.md), the state file,
# the manifests and the Redis file-restore marker (sources/redis/marker.py, not the restore). pyrage comes
# with config's key parsers (about 2 ms); isal is stream/pipeline.py's deflate, chosen at import (under 1 ms).
STATUS_NEEDS = ("pydantic", "pydantic_core", "kkua_backupd.config", "kkua_backupd.core", "kkua_backupd.store.storage",
                "kkua_backupd.sources.redis.", "kkua_backupd.sources.redis.marker", "pyrage", "isal")


def test_status_imports_no_client_library_logger_or_compressor(tmp_path: Path, config: Path) -> None:
    code, modules = loaded(tmp_path, "--config", str(config), "status")
    assert code in (0, 1)  # 1: no job has run yet
    assert {"kkua_backupd.config", "kkua_backupd.core.state", "kkua_backupd.core.health"} <= modules
    assert heavy_in(modules, allowed=STATUS_NEEDS) == []


def test_status_json_and_config_check_import_no_client_library(tmp_path: Path, config: Path) -> None:
    for argv in (["--json", "status"], ["config", "check"]):
        code, modules = loaded(tmp_path, "--config", str(config), *argv)
        assert code in (0, 1), argv
        assert "kkua_backupd.config" in modules, argv
        assert heavy_in(modules, allowed=STATUS_NEEDS) == [], argv


# `status` with the record of an unchanged config (core/status_cache.py, docs/decisions/0024): no pydantic, no
# config models, no manifest model (no set is dated in the future), no store, no job context.
STATUS_WARM_NEEDS = ("kkua_backupd.core.", "kkua_backupd.core.state", "kkua_backupd.core.health",
                     "kkua_backupd.core.status_cache", "kkua_backupd.sources.redis.",
                     "kkua_backupd.sources.redis.marker")


def test_status_from_the_record_of_an_unchanged_config_imports_no_pydantic(tmp_path: Path, config: Path) -> None:
    (tmp_path / "backups" / ".state").mkdir(mode=0o750)  # made by the first job: the record's folder
    code, modules = loaded(tmp_path, "--config", str(config), "status")  # validates, writes the record
    assert code in (0, 1) and "pydantic" in modules
    for argv in (["status"], ["--json", "status"]):
        code, modules = loaded(tmp_path, "--config", str(config), *argv)
        assert code in (0, 1), argv
        assert "kkua_backupd.core.status_cache" in modules and "kkua_backupd.core.health" in modules, argv
        assert heavy_in(modules, allowed=STATUS_WARM_NEEDS) == [], argv


def test_list_and_verify_import_psycopg_only_for_a_note_of_an_unfinished_database(tmp_path: Path,
                                                                                   config: Path) -> None:
    """The clean-up after killed restores (sources/postgres/load.drop_unfinished_databases) needs psycopg only
    when the state folder holds a note of a database one created."""
    state = tmp_path / "backups" / ".state"
    state.mkdir(mode=0o750)
    for argv in (["list"], ["verify"]):
        code, modules = loaded(tmp_path, "--config", str(config), *argv)
        assert code == (0 if argv == ["list"] else 2), argv  # verify: no set to verify
        assert "kkua_backupd.store.storage" in modules, argv  # it did list the folder
        postgres = [m for m in modules
                    if m.split(".")[0] == "psycopg" or m.startswith("kkua_backupd.sources.postgres.")]
        assert postgres == [], argv
    note = state / "postgres-new-database-999999-0123456789abcdef.json"
    note.write_text(json.dumps({"database": "x", "server": "127.0.0.1:1", "pid": 999999,
                                "nonce": "0123456789abcdef"}))
    code, modules = loaded(tmp_path, "--config", str(config), "list")
    assert code == 0 and "psycopg" in modules and "kkua_backupd.sources.postgres.load" in modules
