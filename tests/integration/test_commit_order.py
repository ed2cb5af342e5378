"""The commit order of a backup set, checked on the real CLI from outside (no hook in shipped code): strace
records the order of its renames and fsyncs, and kills it (SIGKILL injected at a chosen syscall) at each
step of the commit: after the data file's rename (no manifest yet), just before the manifest's rename
(manifest still `.partial`), and after the manifest's rename but before the folder's fsync. After each,
`list`, `restore latest` and retention (`prune`) see either the earlier set alone or the complete new one.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kkua_backupd.demo.redis_sample import create_sample
from tests.conftest import Env, RedisEnv
from tests.support.helpers import describe

STRACE = shutil.which("strace")
pytestmark = pytest.mark.skipif(STRACE is None, reason="strace is not installed (scripts/setup.sh installs it)")

_SYSCALL = re.compile(r'^(?P<name>rename|renameat2?|fsync|openat)\((?P<args>.*)\)\s+=\s+(?P<ret>-?\d+)')
_RESUMED = re.compile(r"^<\.\.\. \w+ resumed>(?P<rest>.*)$")


def traced_backup(world: Env | RedisEnv, kind: str, trace: Path, *,
                  threads: bool = False) -> list[tuple[str, str, int]]:
    """Run `backup KIND` under strace (main thread only, or with `threads` all its threads, each call placed
    where it returned); returns its (syscall, args, result) in order."""
    result = subprocess.run([STRACE or "strace", "-qq", *(["-f"] if threads else []), "-o", str(trace), "-e",
                             "trace=rename,renameat,renameat2,fsync,openat", "-e", "signal=none",
                             sys.executable, "-m", "kkua_backupd", "backup", kind],
                            capture_output=True, text=True, env=world.cli_env(), timeout=300, check=False)
    assert result.returncode == 0, describe(result)
    calls = []
    started: dict[str, str] = {}  # a thread's call interrupted by another's: "openat(... <unfinished ...>"
    for traced in trace.read_text().splitlines():
        thread, call = "", traced
        if threads:
            thread, _, call = traced.partition(" ")
            call = call.lstrip()
        if call.endswith("<unfinished ...>"):
            started[thread] = call.removesuffix("<unfinished ...>").rstrip()
            continue
        resumed = _RESUMED.match(call)
        if resumed and thread in started:
            call = started.pop(thread) + resumed["rest"]
        match = _SYSCALL.match(call)
        if match:
            calls.append((match["name"], match["args"], int(match["ret"])))
    return calls


def killed_backup(world: Env | RedisEnv, kind: str, syscall: str, nth: int) -> None:
    """Run `backup KIND` and SIGKILL it as it enters its `nth` call of `syscall`."""
    result = subprocess.run([STRACE or "strace", "-qq", "-o", "/dev/null", "-e", f"trace={syscall}",
                             "-e", f"inject={syscall}:signal=SIGKILL:when={nth}",
                             sys.executable, "-m", "kkua_backupd", "backup", kind],
                            capture_output=True, text=True, env=world.cli_env(), timeout=300, check=False)
    assert result.returncode != 0, f"the backup was not killed at {syscall} #{nth}: {describe(result)}"


def sets(world: Env | RedisEnv, kind: str) -> list[dict[str, Any]]:
    doc: list[dict[str, Any]] = json.loads(world.run("--json", "list", kind, check=True).stdout)
    return doc


def restored_file(world: Env | RedisEnv, kind: str) -> str:
    extra = ["--no-safety-backup"]
    result = world.run("--json", "restore", kind, "latest", "--force", *extra)
    assert result.returncode == 0, describe(result)
    return str(json.loads(result.stdout)["file"])


def pruned(world: Env | RedisEnv) -> dict[str, Any]:
    result = world.run("--json", "prune")
    assert result.returncode == 0, describe(result)
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


@pytest.fixture(params=["postgres", "redis"])
def world(request: pytest.FixtureRequest) -> tuple[Env | RedisEnv, str]:
    kind = str(request.param)
    if kind == "postgres":
        return request.getfixturevalue("env"), kind
    redis_env: RedisEnv = request.getfixturevalue("redis_env")
    create_sample(redis_env.server, large_value_size=4096)
    redis_env.client().config_set("repl-diskless-sync-delay", 0)  # each backup's SYNC starts at once
    return redis_env, kind


def test_commit_order_and_what_a_kill_at_each_step_leaves(world: tuple[Env | RedisEnv, str], workdir: Path) -> None:
    env, kind = world
    folder = str(env.folder)
    # Every run below starts from the same state (folder there, no leftovers: a plain backup removes them),
    # so the n-th rename or fsync of the traced run is the same step in the killed ones.
    env.run("backup", kind, check=True)
    calls = traced_backup(env, kind, workdir / "trace")
    traced = sets(env, kind)[0]
    data_names = {f["name"] for f in traced["files"]}

    # The order, from the trace: every file of the set renamed into place, then the manifest written and
    # renamed, then the folder fsynced (an fsync of an fd opened on the folder with O_DIRECTORY).
    renames = [(i, args) for i, (name, args, _) in enumerate(calls) if name.startswith("rename")]
    # Renames name a path (rename) or a name relative to the folder's descriptor (renameat, as files under
    # the backup folder are opened without following symlinks): match the new name either way.
    def new_name(args: str) -> str:
        return args.rsplit(", ", maxsplit=1)[-1].strip('"').rsplit("/", 1)[-1]

    def dirfd(args: str) -> str:
        return args.split(", ", maxsplit=1)[0]

    data_renames = [i for i, args in renames if new_name(args) in data_names]
    manifest_renames = [i for i, args in renames if new_name(args).endswith(".manifest.json")
                        and (folder in args or dirfd(args) != "AT_FDCWD")]
    manifest_opens = [i for i, (name, args, _) in enumerate(calls)
                      if name == "openat" and ".manifest.json.partial" in args and "O_CREAT" in args]
    assert len(data_renames) == len(data_names) and len(manifest_renames) == 1 and len(manifest_opens) == 1, calls
    assert max(data_renames) < manifest_opens[0] < manifest_renames[0], "the manifest was written before the data"
    folder_fsync = next((i for i in range(manifest_renames[0] + 1, len(calls)) if calls[i][0] == "fsync"), None)
    assert folder_fsync is not None, "nothing was fsynced after the manifest's rename"
    rename_dirfd = dirfd(calls[manifest_renames[0]][1])
    between = calls[manifest_renames[0]:folder_fsync]
    if rename_dirfd != "AT_FDCWD":  # the folder's own descriptor, opened by name with O_DIRECTORY
        folder_fds = [ret for name, args, ret in calls[:manifest_renames[0]]
                      if name == "openat" and f'"{env.folder.name}"' in args and "O_DIRECTORY" in args]
        assert int(rename_dirfd) in folder_fds and int(calls[folder_fsync][1]) == int(rename_dirfd), \
            f"the first fsync after the manifest's rename is not the folder's: {between}"
    else:
        opened = [ret for name, args, ret in calls[manifest_renames[0] + 1:folder_fsync]
                  if name == "openat" and f'"{folder}"' in args and "O_DIRECTORY" in args]
        assert opened and int(calls[folder_fsync][1]) == opened[-1], \
            f"the first fsync after the manifest's rename is not the folder's: {between}"

    # One fsync pass (docs/decisions/0020): each data file is fsynced before its rename, and the folder is
    # fsynced once for all of them, after the last data rename and before the manifest is created.
    opened_folder: dict[int, bool] = {}  # fd -> opened on a folder (O_DIRECTORY), as of that point in the trace
    folder_syncs, file_syncs = [], []
    for i, (name, args, ret) in enumerate(calls):
        if name == "openat" and ret >= 0:
            opened_folder[ret] = "O_DIRECTORY" in args
        elif name == "fsync":
            (folder_syncs if opened_folder.get(int(args), False) else file_syncs).append(i)
    before_manifest = [i for i in folder_syncs if min(data_renames) < i < manifest_opens[0]]
    assert len(before_manifest) == 1 and before_manifest[0] > max(data_renames), \
        f"expected one folder fsync after the data files' renames, before the manifest: {calls}"
    # Each data file fsynced, on the descriptor it was written through, before its rename: traced with the
    # threads too, since a Redis set's INFO and CONFIG files are written on a thread while the RDB streams.
    everything = traced_backup(env, kind, workdir / "trace-threads", threads=True)
    names = {f["name"] for f in sets(env, kind)[0]["files"]}
    moved = [i for i, (name, args, _) in enumerate(everything) if name.startswith("rename") and new_name(args) in names]
    assert len(moved) == len(names), everything
    def renamed(args: str) -> tuple[str, str]:
        old, new = (path.rsplit("/", 1)[-1] for path in re.findall(r'"([^"]*)"', args)[:2])
        return old, new

    for i in moved:
        written = renamed(everything[i][1])[0]
        while True:  # a file renamed more than once (INFO: NAME.partial.partial, NAME.partial, NAME): its first name
            earlier = [j for j in range(i) if everything[j][0].startswith("rename")
                       and renamed(everything[j][1])[1] == written]
            if not earlier:
                break
            written = renamed(everything[earlier[-1]][1])[0]
        created = [(j, ret) for j, (name, args, ret) in enumerate(everything[:i])
                   if name == "openat" and "O_CREAT" in args and re.search(rf'[/"]{re.escape(written)}"', args)]
        assert created, f"{written} was renamed but never created: {everything}"
        opened_at, fd = created[-1]
        assert any(opened_at < j < i and name == "fsync" and int(args) == fd
                   for j, (name, args, _) in enumerate(everything)), \
            f"a data file ({written}) was renamed without its own fsync: {everything}"

    # Where to kill: counted in the main process's calls of one syscall, as strace's when= counts them.
    rename_name = calls[renames[0][0]][0]
    nth_rename = {i: n for n, (i, _) in enumerate(renames, start=1)}
    fsyncs = [i for i, (name, _, _) in enumerate(calls) if name == "fsync"]
    steps = {
        "after the data file's rename": (rename_name, nth_rename[min(data_renames)] + 1),
        "before the manifest's rename": (rename_name, nth_rename[manifest_renames[0]]),
        "before the folder's fsync": ("fsync", fsyncs.index(folder_fsync) + 1),
    }
    for step, (syscall, nth) in steps.items():
        env.run("backup", kind, check=True)
        before = sets(env, kind)
        earlier = before[0]
        killed_backup(env, kind, syscall, nth)
        listed = sets(env, kind)
        if step == "before the folder's fsync":
            # The manifest is in place (only a power loss could lose it now, which the fsync prevents):
            # the set is complete, listed first, and what `restore latest` restores.
            assert len(listed) == len(before) + 1 and listed[1:] == before, (step, listed)
            assert all(s["status"] == "ok" for s in listed), (step, listed)
            assert restored_file(env, kind) == listed[0]["files"][0]["name"], step
            assert env.run("verify", "all").returncode == 0, step
        else:
            assert listed == before, (step, listed)
            assert restored_file(env, kind) == earlier["files"][0]["name"], step
        report = pruned(env)
        assert {s["id"] for s in listed} <= {k["id"] for k in report["kept"]}, (step, report)
        assert all(d.get("type") == "partial" for d in report["deleted"]), (step, report["deleted"])
        assert sets(env, kind) == listed, step
        for backup_set in listed:
            for entry in backup_set["files"]:
                assert (env.folder / entry["name"]).is_file(), f"{step}: {entry['name']} is gone"
