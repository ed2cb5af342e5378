"""The error hierarchy: every failure an operator can see, with the exit code the CLI maps it to.

Messages follow one rule: say what failed, why, and what to do, in one line.
"""

from __future__ import annotations


class KkuaError(Exception):
    """Base of every error this tool reports to an operator; `exit_code` is what the CLI returns."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None, details: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details

    def __str__(self) -> str:
        text = self.message
        if self.hint:
            text = f"{text}; {self.hint}"
        return text


class UsageError(KkuaError):
    """The command line asked for something impossible (exit 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """The configuration is invalid; `problems` lists every `key.path: message` found (exit 2)."""

    def __init__(self, message: str, *, problems: list[str] | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.problems = problems or []

    def __str__(self) -> str:
        text = super().__str__()
        if self.problems:
            text += "\n" + "\n".join(f"  {p}" for p in self.problems)
        return text


class KeyMissing(ConfigError):
    """An encrypted file cannot be read here: no identity_file (age) or passphrase_file (gpg) is configured,
    or it cannot be read (exit 2)."""


class JobError(KkuaError):
    """A backup, restore or verification failed (exit 1)."""


class ConnectionFailed(JobError):
    """A server could not be reached or refused our credentials."""


class CommandFailed(JobError):
    """A child process exited badly; `stderr_tail` holds its last lines."""

    def __init__(self, message: str, *, stderr_tail: list[str] | None = None, hint: str | None = None,
                 returncode: int | None = None) -> None:
        tail = stderr_tail or []
        super().__init__(message, hint=hint, details="\n".join(tail) or None)
        self.stderr_tail = tail
        self.returncode = returncode

    def __str__(self) -> str:
        text = super().__str__()
        if self.stderr_tail:
            text += ": " + " | ".join(self.stderr_tail[-3:])
        return text


class StepTimeout(CommandFailed):
    """A child process ran past its step's timeout and was stopped."""


class StorageError(JobError):
    """The backup folder could not be written or read (disk full, permissions)."""


class Refused(KkuaError):
    """The tool refused to act to protect data (exit 3)."""

    exit_code = 3


class LockHeld(Refused):
    """Another run holds the per-target lock."""


class NotConfirmed(Refused):
    """A restore was not confirmed (declined, or no terminal and no --force)."""


class IntegrityError(Refused):
    """A backup file does not match its manifest or does not decompress."""


class WrongKey(Refused):
    """An encrypted backup cannot be opened with the configured identity or passphrase."""


class VersionTooNew(Refused):
    """A backup or server version this tool or server cannot handle."""


class Interrupted(JobError):
    """The run was stopped by SIGTERM or SIGINT; children were stopped and partial files removed."""
