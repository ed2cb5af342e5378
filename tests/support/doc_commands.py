"""The `kkua-backup` commands shown in README.md, README.ko.md and docs/ (test support): every line of a
shell code block that runs `kkua-backup`, however it is prefixed (sudo, sudo -u kkua-backup,
/opt/kkua-backupd/bin/, `docker compose ... run --rm backup`, VAR=value), as an argument list."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHELL_BLOCKS = ("sh", "bash", "console", "shell")
# What stands before the program on a documented line: privilege changes, the install path, compose.
PREFIX = re.compile(r"^(?:sudo(?: -u kkua-backup)? |runuser -u kkua-backup -- |"
                    r"docker(?:-compose| compose) --profile backup run --rm (?:-T )?backup )*")
PROGRAM = re.compile(r"^(?:/opt/kkua-backupd/bin/)?kkua-backup(?=\s|$)")
ENV_WORD = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")


@dataclass(frozen=True)
class DocCommand:
    """One documented command: where it is, its environment words and its arguments."""

    source: str  # "docs/backup.md:122"
    env: tuple[tuple[str, str], ...]
    args: tuple[str, ...]

    def __str__(self) -> str:
        words = [f"{k}={v}" for k, v in self.env] + ["kkua-backup", *self.args]
        return f"{self.source}: {' '.join(words)}"


def doc_files() -> list[Path]:
    """README.md, README.ko.md and every page under docs/ (docs/ko/ included)."""
    found = [ROOT / name for name in ("README.md", "README.ko.md") if (ROOT / name).is_file()]
    return found + sorted((ROOT / "docs").rglob("*.md"))


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines in shell code blocks; in console blocks only `$ ` prompts."""
    lines: list[tuple[int, str]] = []
    fence: str | None = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else stripped[3:].strip()
            continue
        if fence in SHELL_BLOCKS:
            if fence == "console":
                if not stripped.startswith("$ "):
                    continue
                stripped = stripped[2:]
            lines.append((number, stripped))
    return lines


OPERATORS = {"|", "||", "&&", ";", "&"}


def _simple_commands(line: str) -> list[list[str]]:
    """The words of each simple command on a shell line (split at | && || ; &), without comments and
    redirections; [] when the line is not complete shell (a quote closed on a later line)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        tokens = list(lexer)
    except ValueError:
        return []
    parts: list[list[str]] = [[]]
    skip = False
    for token in tokens:
        if token in OPERATORS:
            parts.append([])
            skip = False
        elif skip:
            continue
        elif token.startswith((">", "<")) or (token[:1].isdigit() and token[1:2] in (">", "<")):
            skip = True  # a redirection: the rest of this command is not its arguments
        else:
            parts[-1].append(token)
    return [part for part in parts if part]


def _inline_commands(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of inline code spans that start with `kkua-backup `, outside code blocks."""
    found: list[tuple[int, str]] = []
    fenced = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            found += [(number, span) for span in re.findall(r"`((?:sudo )?kkua-backup [^`]+)`", line)]
    return found


def _parse(source: str, line: str) -> list[DocCommand]:
    found = []
    for words in _simple_commands(line):
        env = []
        while words and ENV_WORD.match(words[0]):
            key, value = words.pop(0).split("=", 1)
            env.append((key, value))
        rest = PREFIX.sub("", shlex.join(words))
        match = PROGRAM.match(rest)
        if match:
            found.append(DocCommand(source, tuple(env), tuple(shlex.split(rest[match.end():]))))
    return found


def commands(paths: list[Path] | None = None) -> list[DocCommand]:
    """Every `kkua-backup` command in the shell code blocks of these pages (default: doc_files()), in order."""
    found: list[DocCommand] = []
    for path in paths if paths is not None else doc_files():
        for number, line in _code_lines(path):
            found += _parse(f"{path.relative_to(ROOT)}:{number}", line)
    return found


def commands_in(paths: list[Path]) -> list[tuple[str, tuple[str, ...]]]:
    """(page, arguments) of every `kkua-backup` command these pages name: in code blocks and in inline code."""
    found = [(command.source.rsplit(":", 1)[0], command.args) for command in commands(paths)]
    for path in paths:
        for number, span in _inline_commands(path):
            found += [(str(path.relative_to(ROOT)), command.args)
                      for command in _parse(f"{path.relative_to(ROOT)}:{number}", span)]
    return found
