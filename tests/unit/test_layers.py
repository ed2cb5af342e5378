"""The package's imports go downward only (docs/architecture.md): every import between the package's modules,
at the top of a file or inside a function, follows one of the edges written out below, nothing outside
demo/ imports demo/, one data source never imports another, and shipped code never imports the tests."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "kkua_backupd"
NAME = "kkua_backupd"

# Layers, top to bottom: cli -> install/daemon -> core -> sources -> config -> stream/store -> proc -> obs ->
# safefs (opening files under the tool's folders without following symlinks) -> errors.
# core.context (the frozen JobContext and the restore steps every source shares) is the one module of core that
# sources see: it is what core hands a source, and it imports only config, store and errors.
# config (with schedule) sits under sources: every layer above reads the typed config; it imports only
# schedule, errors and stream/encrypt.py's key parsers (recipients are checked at load: fail closed). stream runs
# gpg through proc/execute.py (docs/decisions/0015-encryption.md). `version` is kkua_backupd/__init__.py (the
# version string and where the config file is looked for; nothing else, so `--help` imports nothing heavy).
# remote (S3 and SSH stores: put, stat, list, read, delete) sits beside sources, above config: core decides what
# a set on a remote is and what to copy; a remote only moves files.
# demo is a front-end beside cli: it may use anything below, and nothing imports it.
BELOW_CORE = {"core.context", "sources", "remote", "config", "schedule", "stream", "store", "proc", "obs", "safefs",
              "errors", "version"}
ALLOWED: dict[str, set[str]] = {
    "cli": {"install", "daemon", "core", *BELOW_CORE},
    "demo": {"core", *BELOW_CORE},
    "install": {"core", *BELOW_CORE},
    "daemon": {"core", *BELOW_CORE},
    "core": set(BELOW_CORE),
    "core.context": {"config", "schedule", "store", "stream", "obs", "safefs", "errors", "version"},
    "sources": {"core.context", "config", "schedule", "stream", "store", "proc", "obs", "safefs", "errors", "version"},
    "remote": {"config", "schedule", "stream", "store", "proc", "obs", "safefs", "errors", "version"},
    "config": {"schedule", "stream", "safefs", "errors", "version"},
    "schedule": {"errors"},
    "store": {"stream", "obs", "safefs", "errors", "version"},
    "stream": {"proc", "obs", "safefs", "errors"},
    "proc": {"obs", "safefs", "errors"},
    "obs": {"safefs", "errors"},
    "safefs": {"errors"},
    "errors": set(),
    "version": set(),
}


def layer(module: str) -> str:
    """The layer of a module of the package (`kkua_backupd.sources.redis.rdb` -> `sources`)."""
    parts = module.split(".")[1:]
    if not parts:
        return "version"
    if parts[0] in ("cli", "__main__"):
        return "cli"
    if parts[:2] == ["core", "context"]:
        return "core.context"
    return parts[0]


def module_name(path: Path) -> str:
    parts = [NAME, *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """Every module this file imports (at any depth), as absolute names, with its line."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module_name(path).split(".")
                if path.name != "__init__.py":
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            modules = [f"{target}.{alias.name}" for alias in node.names if is_module(f"{target}.{alias.name}")]
            found += [(node.lineno, module) for module in modules]
            if len(modules) < len(node.names):
                found.append((node.lineno, target))
    return found


def is_module(name: str) -> bool:
    """`from kkua_backupd.x import y` imports the module x.y when there is one."""
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    assert {layer(module_name(p)) for p in SOURCES} <= set(ALLOWED)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_downward_only(path: Path) -> None:
    here = module_name(path)
    bad = []
    for line, target in imports(path):
        if target.split(".")[0] == "tests":
            bad.append(f"line {line}: {target} (shipped code never imports the tests)")
        if not (target == NAME or target.startswith(NAME + ".")):
            continue
        mine, theirs = layer(here), layer(target)
        if theirs == "demo" and mine != "demo":
            bad.append(f"line {line}: {target} (only demo/ imports demo/)")
        elif mine != theirs and theirs not in ALLOWED[mine]:
            bad.append(f"line {line}: {target} ({mine} may not import {theirs})")
        if mine == theirs == "sources":
            source_here, source_there = here.split(".")[2:3], target.split(".")[2:3]
            if source_here and source_there and source_here != source_there:
                bad.append(f"line {line}: {target} (one data source never imports another)")
    assert bad == [], f"{path.relative_to(PACKAGE.parent)}: " + "; ".join(bad)
