"""The record of the validated config that `status` reads instead of validating an unchanged config
(core/status_cache.py, docs/decisions/0024). Every case runs the real command line in a fresh interpreter and
looks at what it printed, its exit code and whether it imported pydantic (validated): the record must never
make `status` show what a fresh validation would refuse, and is ignored unless it is the tool's own."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from kkua_backupd.config import ENV_OVERRIDES, NOTIFY_ENV, S3_CREDENTIAL_KEYS, SECRET_ENV, Config
from kkua_backupd.core import status_cache
from kkua_backupd.core.status_cache import CACHE_FILE
from kkua_backupd.safefs import set_trusted_roots
from tests.unit.test_startup import PROBE, ROOT

SECRET = "s3cr3t-Passw0rd-never-stored"
NOBODY = 65534


class World:
    """A config with its folders (the state folder made, as after a first job), and the CLI run on it."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.backup_dir, self.log_dir = tmp_path / "backups", tmp_path / "logs"
        for folder in (self.backup_dir, self.log_dir, self.backup_dir / ".state"):
            folder.mkdir(mode=0o750)
        self.state = self.backup_dir / ".state"
        self.cache = self.state / CACHE_FILE
        self.config = tmp_path / "config.toml"
        self.password_file = tmp_path / "pg.pass"
        self.password_file.write_text(SECRET + "\n")
        self.password_file.chmod(0o600)
        self.write('postgres = "*-*-* 02:00:00"')

    def write(self, schedule: str, extra: str = "") -> None:
        self.config.write_text(f'backup_dir = "{self.backup_dir}"\nlog_dir = "{self.log_dir}"\n{extra}\n'
                               f'[postgres]\npassword_file = "{self.password_file}"\n\n[schedule]\n{schedule}\n')
        time.sleep(0.1)  # older than the validation that reads it (status_cache.SETTLED_NS)

    def run(self, *argv: str, env: dict[str, str] | None = None, user: int | None = None) -> tuple[object, str, bool]:
        """`kkua-backup --config CONFIG ARGV` (as `user`, without supplementary groups, when given): its exit
        code, its output and whether it imported pydantic."""
        out = self.tmp / ("modules.json" if user is None else f"out-{user}/modules.json")
        child = {k: v for k, v in os.environ.items()
                 if k not in (*status_cache.ENV_NAMES, "JOURNAL_STREAM", "XDG_CACHE_HOME") or k == "TZ"}
        child.update(env or {}, PYTHONPATH=str(ROOT))
        as_user: dict[str, Any] = {} if user is None else {"user": user, "group": user, "extra_groups": []}
        proc = subprocess.run([sys.executable, "-c", PROBE, str(out), "--config", str(self.config), *argv],
                              env=child, cwd=self.tmp, capture_output=True, text=True, timeout=120, check=False,
                              **as_user)
        doc = json.loads(out.read_text())
        return doc["code"], proc.stdout + proc.stderr, "pydantic" in doc["modules"]

    def warm(self, env: dict[str, str] | None = None) -> None:
        """Run `status` until it reads the record (the first run validates and writes it)."""
        self.run("status", env=env)
        code, output, validated = self.run("status", env=env)
        assert code in (0, 1) and not validated, output


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_status_from_the_record_shows_what_validation_shows(world: World) -> None:
    code, cold, validated = world.run("--json", "status")
    assert validated and code in (0, 1)
    assert world.cache.exists() and world.cache.stat().st_mode & 0o777 == 0o640
    code_warm, warm, validated = world.run("--json", "status")
    assert not validated and code_warm == code
    cold_doc, warm_doc = json.loads(cold), json.loads(warm)
    for doc in (cold_doc, warm_doc):  # computed from the clock: the same config gives the same schedule
        for job in doc["jobs"].values():
            assert job.pop("next_run")
    assert warm_doc == cold_doc
    _, human, validated = world.run("status")
    assert not validated and "*-*-* 02:00:00" in human and "postgres:" in human


def test_the_record_holds_no_secret(world: World) -> None:
    world.warm(env={"REDIS_PASSWORD": SECRET + "-redis", "KKUA_WEBHOOK_URL": f"https://hooks.example/{SECRET}"})
    text = world.cache.read_text()
    assert SECRET not in text and "hooks.example" not in text
    entry = json.loads(text)["entries"][0]
    assert set(entry) == {"key", "files", "status"} and str(world.password_file) in entry["files"]


def test_an_edited_config_is_validated_again(world: World) -> None:
    world.warm()
    world.write('postgres = "*-*-* 05:30:00"')
    code, output, validated = world.run("status")
    assert validated and "*-*-* 05:30:00" in output and "02:00:00" not in output
    world.write('postgres = "every full moon"')
    code, output, validated = world.run("status")
    assert validated and code == 2 and "schedule.postgres" in output, output
    code, output, validated = world.run("status")  # an invalid config leaves no record to use
    assert validated and code == 2


@pytest.mark.parametrize(("name", "value", "error"), [
    ("DATABASE_PORT", "five", "postgres.port"),
    ("BACKUP_RETENTION_DAYS", "0", "retention.days"),
    ("KKUA_WEBHOOK_URL", "ftp://hooks.example/x", "notify.webhook_url"),
])
def test_a_changed_variable_the_config_reads_is_validated_again(world: World, name: str, value: str,
                                                                error: str) -> None:
    world.warm()
    code, output, validated = world.run("status", env={name: value})
    assert validated and code == 2 and error in output, output


def test_a_password_file_made_readable_by_others_is_validated_again(world: World) -> None:
    world.warm()
    world.password_file.chmod(0o644)
    code, output, validated = world.run("status")
    assert validated and code == 2 and "readable by others" in output, output


def test_an_env_file_with_a_bad_value_is_validated_again(world: World) -> None:
    env_file = world.tmp / "kkua.env"
    env_file.write_text("REDIS_PORT=6379\n")
    env_file.chmod(0o600)
    world.write('postgres = "*-*-* 02:00:00"', extra=f'env_file = "{env_file}"')
    world.warm()
    env_file.write_text("REDIS_PORT=many\n")
    code, output, validated = world.run("status")
    assert validated and code == 2 and "redis.port" in output, output


@pytest.mark.parametrize("content", ["", "not json", "[]", '{"format": 1, "entries": 3}',
                                     '{"format": 1, "entries": [{"key": "00", "files": [], "status": {}}]}',
                                     '{"format": 1, "entries": [{"key": "00", "files": ["a\\u0000b"]}]}',
                                     "\xff\xfe", "[" * 100_000],
                         ids=["empty", "text", "list", "entries", "wrong-key", "nul-path", "not-utf8", "nested"])
def test_a_corrupt_record_is_ignored_and_replaced(world: World, content: str) -> None:
    world.warm()
    world.cache.write_bytes(content.encode("latin-1"))
    code, output, validated = world.run("status")
    assert validated and code in (0, 1), output
    assert json.loads(world.cache.read_text())["entries"]  # rewritten by the validating run
    assert not world.run("status")[2]


def crafted(world: World, **changes: object) -> dict[str, object]:
    """The record `status` would use, with its view changed (`changes`): a right key, values it never wrote."""
    doc = json.loads(world.cache.read_text())
    doc["entries"][0]["status"].update(changes)
    return doc


def test_a_record_whose_view_is_malformed_or_elsewhere_is_ignored(world: World) -> None:
    world.warm()
    for changes in ({"schedule": {"postgres": "Mon 05:00"}}, {"remote": [{"name": 1, "url": "x"}]},
                    {"backup_dir": str(world.tmp / "elsewhere")}, {"extra": True}):
        world.cache.write_text(json.dumps(crafted(world, **changes)))
        code, output, validated = world.run("status")
        assert validated and code in (0, 1), (changes, output)


def test_a_record_anyone_else_could_have_written_is_ignored(world: World) -> None:
    world.warm()
    world.cache.chmod(0o666)
    assert world.run("status")[2]
    world.cache.chmod(0o640)
    world.state.chmod(0o770)
    assert world.run("status")[2]
    world.state.chmod(0o750)
    assert not world.run("status")[2]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_record_or_folder_owned_by_another_user_is_ignored(world: World) -> None:
    world.warm()
    os.chown(world.cache, NOBODY, NOBODY)
    code, output, validated = world.run("status")
    assert validated, output
    world.cache.unlink()
    world.warm()
    os.chown(world.state, NOBODY, NOBODY)
    code, output, validated = world.run("status")
    assert validated, output  # and status itself refuses the stranger's state folder, as before
    assert code == 3 and "owned by" in output, output


def test_a_symlinked_record_or_state_folder_is_not_followed(world: World) -> None:
    world.warm()
    elsewhere = world.tmp / "elsewhere"
    elsewhere.mkdir(mode=0o750)
    (elsewhere / CACHE_FILE).write_bytes(world.cache.read_bytes())  # the right key, but not in the folder
    world.cache.unlink()
    world.cache.symlink_to(elsewhere / CACHE_FILE)
    code, output, validated = world.run("status")
    assert validated, output
    world.cache.unlink()
    (elsewhere / CACHE_FILE).unlink()
    world.warm()
    world.state.rename(elsewhere / ".state")
    world.state.symlink_to(elsewhere / ".state")
    code, output, validated = world.run("status")
    assert validated and code == 3 and "symlink" in output, output


def test_only_status_writes_the_record(world: World) -> None:
    for argv in (["config", "check"], ["list"], ["--json", "prune", "--dry-run"]):
        code, output, validated = world.run(*argv)
        assert code == 0 and validated, (argv, output)
        assert not world.cache.exists(), argv
    world.run("status")
    assert world.cache.exists()


def test_a_failed_validation_writes_no_record(world: World) -> None:
    world.write('postgres = "every full moon"')
    assert world.run("status")[0] == 2
    assert not world.cache.exists()


def test_a_future_dated_set_is_still_named_from_the_record(world: World) -> None:
    world.warm()
    manifest = json.loads((ROOT / "tests/unit/manifests/pg_plain.manifest.json").read_text())
    manifest["created_at"] = "2999-01-01T00:00:00+00:00"
    folder = world.backup_dir / "postgres"
    folder.mkdir(mode=0o750)
    (folder / f"{manifest['prefix']}{manifest['id']}.manifest.json").write_text(json.dumps(manifest))
    _, output, validated = world.run("status")
    assert validated and "is dated 2999-01-01" in output, output  # the manifests needed pydantic
    manifest["created_at"] = "2020-01-01T00:00:00+00:00"
    (folder / f"{manifest['prefix']}{manifest['id']}.manifest.json").write_text(json.dumps(manifest))
    _, output, validated = world.run("status")
    assert not validated and "is dated" not in output, output


def test_only_status_reads_the_record() -> None:
    """Jobs, the daemon and every other command act on a config validated afresh: `cached` is called once,
    in cli.main's branch for `status`."""
    calls = []
    for path in (ROOT / "kkua_backupd").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr == "cached") or (
                    isinstance(node, ast.Name) and node.id == "cached"):
                calls.append(path.relative_to(ROOT).as_posix())
    assert calls == ["kkua_backupd/cli.py"]
    source = (ROOT / "kkua_backupd/cli.py").read_text()
    assert 'args.command == "status" and (view := status_cache.cached(' in source


def test_what_the_reader_assumes_matches_the_loader() -> None:
    read = {"KKUA_BACKUP_CONFIG", *ENV_OVERRIDES, *SECRET_ENV, *NOTIFY_ENV, *S3_CREDENTIAL_KEYS}
    assert read <= set(status_cache.ENV_NAMES)
    defaults = Config()
    assert (Path(status_cache.DEFAULT_BACKUP_DIR), Path(status_cache.DEFAULT_LOG_DIR)) == (defaults.backup_dir,
                                                                                         defaults.log_dir)
    assert defaults.state_file == defaults.backup_dir / status_cache.STATE_FOLDER / status_cache.STATE_NAME


def test_a_partial_record_left_by_a_killed_writer_does_not_stop_the_next(world: World) -> None:
    partial = world.state / (CACHE_FILE + ".partial")
    partial.write_text("{")  # a writer now: left alone, and this run writes no record
    assert world.run("status")[2]
    assert partial.exists() and not world.cache.exists()
    old = time.time() - 2 * status_cache.STALE_PARTIAL_S
    os.utime(partial, (old, old))  # a writer killed a while ago
    assert world.run("status")[2]
    assert not partial.exists() and world.cache.exists()
    assert not world.run("status")[2]


def test_no_record_when_a_file_validation_read_changes_around_the_validation(world: World) -> None:
    """The record's key holds the stat taken after validation: a file changed while validation read it would
    be recorded with the verdict on its old content, so nothing is written then."""
    from kkua_backupd.config import load_config
    environ = {"PATH": os.environ.get("PATH", "")}
    started = time.time_ns()
    loaded = load_config(str(world.config), environ)
    world.password_file.chmod(0o600)  # a change (its ctime) after validation began
    status_cache.remember(loaded, str(world.config), environ, started)
    assert not world.cache.exists()
    time.sleep(2 * status_cache.SETTLED_NS / 1e9)
    started = time.time_ns()
    status_cache.remember(load_config(str(world.config), environ), str(world.config), environ, started)
    assert world.cache.exists()
    try:
        assert status_cache.cached(str(world.config), environ) is not None
    finally:
        set_trusted_roots()  # `cached` declares the config's folders, as a `status` process does


@pytest.mark.skipif(os.geteuid() != 0, reason="running as another user needs root")
def test_a_group_member_who_may_not_write_the_state_folder_keeps_the_record_in_their_own_cache() -> None:
    """A member of the backup folder's group reads the state folder but may not write it: their record goes to
    their own `~/.cache/kkua-backup` (0700, theirs), is read from there, and one there that is not theirs is
    ignored; root writes the state folder's, never into a HOME it was given."""
    base = Path(tempfile.mkdtemp(prefix="kkua-status-"))  # pytest's tmp_path is root's alone
    try:
        base.chmod(0o755)
        world = World(base)
        for path in (world.backup_dir, world.state, world.log_dir, world.config, world.password_file):
            os.chown(path, 0, NOBODY)
        world.config.chmod(0o640)
        world.password_file.chmod(0o640)
        home, out = base / "home", base / f"out-{NOBODY}"
        for folder in (home, out):
            folder.mkdir(mode=0o700)
            os.chown(folder, NOBODY, NOBODY)
        env = {"HOME": str(home)}
        record = home / ".cache" / "kkua-backup" / CACHE_FILE

        code, cold, validated = world.run("status", env=env, user=NOBODY)
        assert validated and code in (0, 1), cold
        assert not world.cache.exists()  # the state folder is not this user's to write
        assert record.stat().st_uid == NOBODY and record.stat().st_mode & 0o777 == 0o640
        assert record.parent.stat().st_uid == NOBODY and record.parent.stat().st_mode & 0o777 == 0o700
        assert SECRET not in record.read_text()
        code_warm, warm, validated = world.run("status", env=env, user=NOBODY)
        assert not validated and code_warm == code and warm == cold

        os.chown(record, 0, 0)  # a record in their folder that another user wrote (readable): not theirs, not used
        record.chmod(0o644)
        assert world.run("status", env=env, user=NOBODY)[2]

        record.unlink()
        assert world.run("status", env=env)[2] and world.cache.exists()  # root: the state folder's record
        assert not record.exists()
        assert not world.run("status", env=env)[2]
    finally:
        shutil.rmtree(base, ignore_errors=True)
