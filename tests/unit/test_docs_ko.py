"""The Korean documentation (README.ko.md, docs/ko/) says what the English reference (README.md, docs/*.md)
says: every `kkua-backup` command (with the options it is shown with), every config key and every
environment variable named in one is named in the other. When a feature lands with English docs only, the
failure names the command or key and the English page that names it, so the Korean page can follow."""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import BaseModel

from kkua_backupd.config import NOTIFY_ENV, S3_CREDENTIAL_KEYS, Config

from ..support.doc_commands import ROOT, commands_in

ENGLISH = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
KOREAN = [ROOT / "README.ko.md", *sorted((ROOT / "docs" / "ko").glob("*.md"))]
# Commands whose second word is a kind or an action: `restore redis`, `systemd install`, ...
TWO_WORDS = {"backup", "run", "restore", "systemd", "cron", "config", "key"}
# Only what a person sets: the guide's variables and the tool's own.
# The notice URLs (KKUA_HEALTHCHECKS_URL, ...) and the S3 keys (AWS_*) come from the config module's own lists.
ENV_VAR = re.compile(r"\b(?:(?:DATABASE|REDIS)_(?:HOST|PORT|NAME|USER|PASSWORD)|BACKUP_RETENTION_DAYS|BACKUP_AOF|"
                     r"FORCE_RESTORE|TEST_RESTORE|KKUA_BACKUP_CONFIG|KKUA_NO_PROGRESS|"
                     + "|".join(sorted([*NOTIFY_ENV, *S3_CREDENTIAL_KEYS])) + r")\b")
# `[postgres]`, and `[[remote]]` (a list of tables: its keys are remote.url, ...).
SECTION_HEADING = re.compile(r"^#+ .*`?\[\[?([a-z_]+)\]\]?`?")
TOML_SECTION = re.compile(r"^\[\[?([a-z_]+)\]\]?")
TABLE_KEY = re.compile(r"^\|\s*`([a-z_]+)`\s*\|")
TOML_KEY = re.compile(r"^#?\s*([a-z_]+)\s*=")


def _section_model(annotation: object) -> type[BaseModel] | None:
    """The model of a section: `PostgresConfig`, `EncryptionConfig | None` (an optional section) or
    `list[RemoteConfig]` (a list of tables, `[[remote]]`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (list, typing.Union, types.UnionType):
        models = [model for arg in typing.get_args(annotation) if (model := _section_model(arg)) is not None]
        return models[0] if len(models) == 1 else None
    return None


def _key_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    found = []
    for name, field in model.model_fields.items():
        section = _section_model(field.annotation)
        if section is not None:
            found += _key_paths(section, f"{prefix}{name}.")
        elif name != "password":  # filled from password_file or the environment, never written in the file
            found.append(prefix + name)
    return found


KEYS = _key_paths(Config)
SECTIONS = {key.split(".")[0] for key in KEYS if "." in key}


def named_commands(paths: list[Path]) -> dict[str, str]:
    """Each command named in these pages (`restore redis`, `restore redis --flush`, ...) -> the first page
    that names it."""
    found: dict[str, str] = {}
    for path, args in commands_in(paths):
        words = [arg for arg in args if not arg.startswith("-")]
        if not words:
            continue
        name = " ".join(words[:2]) if words[0] in TWO_WORDS and len(words) > 1 else words[0]
        if not re.fullmatch(r"[a-z][a-z-]*( [a-z][a-z-]*)?", name):  # `notify-failure`, `key signing-key`
            continue  # a placeholder or example value, not a command
        found.setdefault(name, path)
        for option in (arg.split("=")[0] for arg in args if arg.startswith("--")):
            found.setdefault(f"{name} {option}", path)
    return found


def named_keys(paths: list[Path]) -> dict[str, str]:
    """Each config key (`postgres.port`, `backup_dir`) and environment variable named in these pages -> the
    first page: as a dotted path, as a table row or TOML line under its [section], or top-level in TOML."""
    found: dict[str, str] = {}
    for path in paths:
        page = str(path.relative_to(ROOT))
        text = path.read_text()
        for key in KEYS:
            if "." in key and re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", text):
                found.setdefault(key, page)
        for variable in ENV_VAR.findall(text):
            found.setdefault(variable, page)
        section = ""
        for line in text.splitlines():
            heading = SECTION_HEADING.match(line)
            toml_section = TOML_SECTION.match(line.strip())
            if heading or toml_section:
                section = (heading or toml_section).group(1)  # type: ignore[union-attr]
                section = section if section in SECTIONS else ""
                continue
            for pattern in (TABLE_KEY, TOML_KEY):
                match = pattern.match(line.strip())
                if match:
                    key = f"{section}.{match.group(1)}" if section else match.group(1)
                    if key in KEYS:
                        found.setdefault(key, page)
    return found


def _missing(source: dict[str, str], target: dict[str, str], what: str, where: str) -> list[str]:
    return [f"{what} `{name}` is named in {page} but in no {where} page" for name, page in sorted(source.items())
            if name not in target]


def test_korean_pages_exist() -> None:
    for name in ("README.ko.md", "docs/ko/install.md", "docs/ko/configuration.md", "docs/ko/backup-restore.md",
                 "docs/ko/disaster-recovery.md", "docs/ko/guide-mapping.md", "docs/ko/offsite.md",
                 "docs/ko/monitoring.md"):
        assert (ROOT / name).is_file(), name


@pytest.mark.parametrize(("what", "named", "at_least"), [("command", named_commands, 30),
                                                        ("config key", named_keys, 40)])
def test_every_name_in_english_is_in_korean_and_back(what: str, named: Callable[[list[Path]], dict[str, str]],
                                                     at_least: int) -> None:
    """Commands (with their options), then config keys and environment variables."""
    english, korean = named(ENGLISH), named(KOREAN)
    assert len(english) > at_least, english
    problems = (_missing(english, korean, what, "Korean (README.ko.md, docs/ko/)")
                + _missing(korean, english, what, "English (README.md, docs/*.md)"))
    assert problems == [], "\n".join(problems)
