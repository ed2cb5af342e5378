"""Configuration: one TOML file validated by strict pydantic models, overridden by the guide's variables.

Precedence, lowest first: built-in defaults, the TOML file, `env_file` (the application's `.env`,
read as data, never executed), the process environment. Every problem found is reported at once,
each naming its key path and where the value came from.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from kkua_backupd import CONFIG_ENV as CONFIG_ENV  # noqa: PLC0414 (re-exported: the config's names for it)
from kkua_backupd import DEFAULT_CONFIG_PATH as DEFAULT_CONFIG_PATH  # noqa: PLC0414 (re-exported)
from kkua_backupd import resolve_config_path as resolve_config_path  # noqa: PLC0414 (re-exported)
from kkua_backupd import schedule
from kkua_backupd.errors import ConfigError, KeyMissing
from kkua_backupd.stream.encrypt import AgeIdentity, Keys, parse_identities, parse_recipient, recipient_lines

# Paths are written as TOML strings, so they are the one type allowed to convert.
PathValue = Annotated[Path, Strict(False)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


def _check_level(compression: str, level: int | None) -> None:
    if level is not None:
        limit = {"gzip": 9, "zstd": 19}.get(compression)
        if limit is None:
            raise ValueError('compression_level has no meaning with compression = "none"; remove it')
        if level > limit:
            raise ValueError(f"compression_level must be 1 to {limit} for {compression}, not {level}")


def _level_validator(level: int | None, info: ValidationInfo) -> int | None:
    """compression_level checked against the section's compression (when that one is valid)."""
    compression = info.data.get("compression")
    if isinstance(compression, str):
        _check_level(compression, level)
    return level


# A field validator, not a model one: pydantic runs model validators only once every field is valid, so a level
# that does not fit would be reported only after the other problems were fixed.
_LEVEL_FITS_COMPRESSION = field_validator("compression_level")(_level_validator)


class PostgresConfig(_Strict):
    """Where the PostgreSQL database is and how its backups are made."""

    host: str = "localhost"
    port: int = Field(5432, ge=1, le=65535)
    database: str = Field("kkua", min_length=1)
    user: str = Field("postgres", min_length=1)
    password_file: PathValue | None = None
    format: Literal["plain", "custom", "directory"] = "plain"
    compression: Literal["gzip", "zstd", "none"] = "gzip"
    compression_level: int | None = Field(None, ge=1, le=19)
    threads: int = Field(0, ge=0, le=256, description="compression threads; 0 means one per CPU")
    restore_jobs: int = Field(0, ge=0, le=64,
                              description="pg_restore -j for the custom and directory formats; 0 means one per CPU")
    dump_jobs: int = Field(2, ge=1, le=64, description="pg_dump -j for the directory format (each job is one more "
                                                       "connection to the server)")
    test_restore: bool = False
    connect_timeout: int = Field(10, ge=1, le=600)
    dump_timeout: int = Field(6 * 3600, ge=1)
    restore_timeout: int = Field(6 * 3600, ge=1)
    bin_dir: PathValue | None = None
    # Filled from password_file or DATABASE_PASSWORD by the loader; never read from the TOML file.
    password: SecretStr | None = Field(None, exclude=True)

    _level_fits_compression = _LEVEL_FITS_COMPRESSION


class RedisConfig(_Strict):
    """Where the Redis server is, how its RDB is captured and how restores reach it."""

    host: str = "localhost"
    port: int = Field(6379, ge=1, le=65535)
    username: str | None = Field(None, min_length=1, description="ACL user (Redis 6+); default user if unset")
    password_file: PathValue | None = None
    aof: bool = False
    compression: Literal["gzip", "zstd", "none"] = "gzip"
    compression_level: int | None = Field(None, ge=1, le=19)
    threads: int = Field(0, ge=0, le=256, description="compression threads; 0 means one per CPU")
    # When SYNC is refused (ACL, managed services): "bgsave" asks the server to save and copies
    # dir/dbfilename when that file is reachable from here; "none" fails with the reason.
    sync_fallback: Literal["bgsave", "none"] = "bgsave"
    # Where the server's dir is reachable from here when it differs from CONFIG GET dir (a sidecar mount).
    data_dir: PathValue | None = None
    connect_timeout: int = Field(10, ge=1, le=600)
    capture_timeout: int = Field(3600, ge=1, description="seconds for the whole RDB capture")
    bgsave_timeout: int = Field(600, ge=1)
    restore_mode: Literal["logical", "file"] = "logical"
    restore_timeout: int = Field(6 * 3600, ge=1)
    # File-mode restores stop and start the server with these commands (argv lists, no shell),
    # e.g. ["systemctl", "stop", "redis-server"].
    stop_command: list[str] | None = None
    start_command: list[str] | None = None
    bin_dir: PathValue | None = Field(None, description="where redis-server and redis-check-rdb are")
    password: SecretStr | None = Field(None, exclude=True)

    _level_fits_compression = _LEVEL_FITS_COMPRESSION

    @model_validator(mode="after")
    def _commands_are_lists(self) -> RedisConfig:
        for name in ("stop_command", "start_command"):
            value = getattr(self, name)
            if value is not None and (not value or not value[0]):
                raise ValueError(f"{name} must be a non-empty list such as [\"systemctl\", \"stop\", "
                                 f"\"redis-server\"]")
        return self


class RetentionConfig(_Strict):
    """How long backup sets are kept; safety backups (taken before restores) have their own limits."""

    days: int = Field(7, ge=1)
    keep_last: int = Field(3, ge=1)
    safety_days: int = Field(30, ge=1)
    safety_keep_last: int = Field(1, ge=0)


class ScheduleConfig(_Strict):
    """When each job runs, in systemd OnCalendar syntax (checked against `systemd-analyze calendar`)."""

    # timezone first: the expressions are validated in it.
    timezone: str | None = Field(None, description="IANA zone for expressions without one; default: local time")
    postgres: str = "*-*-* 02:00:00"
    redis: str = "*-*-* 03:00:00"
    retention: str = "Sun *-*-* 04:00:00"
    randomized_delay: int = Field(0, ge=0, le=86400, description="seconds, like RandomizedDelaySec=")
    persistent: bool = Field(True, description="run a job missed while nothing was running, like Persistent=true")
    overdue_after: int = Field(3600, ge=60, description="seconds past a scheduled run (plus randomized_delay) "
                                                     "after which `status` and `check` call a job without a newer "
                                                     "success overdue")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        try:
            schedule.resolve_zone(value)
        except ValueError as exc:
            raise PydanticCustomError("schedule", str(exc)) from None
        return value

    @field_validator("postgres", "redis", "retention")
    @classmethod
    def _systemd_accepts(cls, value: str, info: ValidationInfo) -> str:
        try:
            # An invalid zone was reported on its own; the expression is then checked in local time.
            schedule.validate(value, info.data.get("timezone"))
        except ValueError as exc:
            raise PydanticCustomError("schedule", str(exc)) from None
        return value


class DaemonConfig(_Strict):
    """How the daemon runs jobs: each in a subprocess worker with a timeout and retries."""

    job_timeout: int = Field(6 * 3600, ge=1, description="seconds before a worker is stopped")
    retries: int = Field(2, ge=0, le=20)
    retry_backoff: int = Field(60, ge=1, description="seconds before the first retry; doubles each time")
    stop_grace: int = Field(30, ge=1, description="seconds a worker gets after SIGTERM before SIGKILL")
    state_file: PathValue | None = Field(None, description="last runs; default backup_dir/.state/jobs.json")


class MetricsConfig(_Strict):
    """Prometheus metrics: a text file for node_exporter's textfile collector, and the daemon's /metrics."""

    textfile: PathValue | None = Field(None, description="written atomically after every job; off when unset")
    listen: str | None = Field(None, description="HOST:PORT of the daemon's /metrics; off (no socket) when unset")

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            split_listen(value)
        return value


def split_listen(value: str) -> tuple[str, int]:
    """`127.0.0.1:9187` or `[::1]:9187` as (host, port); raises ValueError saying what is wrong."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"listen must be HOST:PORT such as \"127.0.0.1:9187\", not {value!r}")
    return host, int(port)


class NotifyConfig(_Strict):
    """Notices of each job's start, success and failure. The URLs are secrets: read from files or the
    environment (KKUA_HEALTHCHECKS_URL, KKUA_WEBHOOK_URL), never from this file, and never logged."""

    healthchecks_url_file: PathValue | None = Field(None, description="healthchecks.io-style ping URL: /start, "
                                                                      "success, /fail with the log tail")
    webhook_url_file: PathValue | None = Field(None, description="a JSON POST on success and failure")
    timeout: int = Field(5, ge=1, le=60, description="seconds per attempt; one retry; never fails the job")
    log_lines: int = Field(20, ge=0, le=500, description="last log lines sent with a failure")
    healthchecks_url: SecretStr | None = Field(None, exclude=True)
    webhook_url: SecretStr | None = Field(None, exclude=True)


class RestoreConfig(_Strict):
    """Restore behaviour; `force` skips the confirmation (FORCE_RESTORE)."""

    force: bool = False


REMOTE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_S3_URL_RE = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(?P<prefix>[^?#]*))?$")
_SFTP_URL_RE = re.compile(r"^sftp://(?P<user>[A-Za-z0-9._][A-Za-z0-9._-]*)@(?P<host>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])"
                          r"(?::(?P<port>[0-9]{1,5}))?(?P<path>/[^?#]*)$")
_SAFE_PATH_RE = re.compile(r"^[A-Za-z0-9._/-]*$")
S3_CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
                      "AWS_DEFAULT_REGION")


class RemoteConfig(_Strict):
    """One place every complete set is copied to: an S3 (or S3-compatible) bucket or an SSH host
    (docs/remotes.md). The S3 keys are read by the loader from `credentials_file` or the environment."""

    name: str
    url: str
    endpoint: str | None = None
    credentials_file: PathValue | None = None
    identity_file: PathValue | None = None
    known_hosts: PathValue | None = None
    keep_last: int = Field(7, ge=1)
    days: int = Field(30, ge=1)
    # Filled by the loader (credentials_file, else the environment); never read from the TOML file.
    access_key_id: str | None = Field(None, exclude=True)
    secret_access_key: SecretStr | None = Field(None, exclude=True)
    session_token: SecretStr | None = Field(None, exclude=True)
    region: str | None = Field(None, exclude=True)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not REMOTE_NAME_RE.match(value):
            raise ValueError(f"{value!r} is not a remote name: use 1-32 of a-z, 0-9, '-', '_', starting with a "
                             "letter or digit")
        return value

    @property
    def scheme(self) -> Literal["s3", "sftp"]:
        return "s3" if self.url.startswith("s3://") else "sftp"

    def s3_parts(self) -> tuple[str, str]:
        """Bucket and prefix (without slashes at either end) of an s3:// url."""
        match = _S3_URL_RE.match(self.url)
        assert match is not None
        return match.group("bucket"), (match.group("prefix") or "").strip("/")

    def sftp_parts(self) -> tuple[str, str, int, str]:
        """User, host, port and folder of an sftp:// url."""
        match = _SFTP_URL_RE.match(self.url)
        assert match is not None
        return (match.group("user"), match.group("host").strip("[]"), int(match.group("port") or 22),
                match.group("path").rstrip("/") or "/")

    @model_validator(mode="after")
    def _url_fits_keys(self) -> RemoteConfig:
        if self.url.startswith("s3://"):
            match = _S3_URL_RE.match(self.url)
            if not match:
                raise ValueError(f"url {self.url!r} is not s3://BUCKET/PREFIX (bucket: 3-63 of a-z, 0-9, '.', '-')")
            prefix = match.group("prefix") or ""
            if not _SAFE_PATH_RE.match(prefix) or ".." in prefix.split("/"):
                raise ValueError(f"url {self.url!r}: the prefix may hold only A-Z, a-z, 0-9, '.', '_', '-', '/' "
                                 "and no '..'")
            wrong = [k for k in ("identity_file", "known_hosts") if getattr(self, k) is not None]
            if wrong:
                raise ValueError(f"{', '.join(wrong)} are for sftp:// remotes, not s3://")
            if self.endpoint is not None and not re.match(r"^https?://[^/?#\s]+/?$", self.endpoint):
                raise ValueError(f"endpoint {self.endpoint!r} is not http(s)://HOST[:PORT]")
        elif self.url.startswith("sftp://"):
            match = _SFTP_URL_RE.match(self.url)
            if not match or not 1 <= int(match.group("port") or 22) <= 65535:
                raise ValueError(f"url {self.url!r} is not sftp://USER@HOST[:PORT]/ABSOLUTE/PATH")
            if not _SAFE_PATH_RE.match(match.group("path")) or ".." in match.group("path").split("/"):
                raise ValueError(f"url {self.url!r}: the path may hold only A-Z, a-z, 0-9, '.', '_', '-', '/' "
                                 "and no '..'")
            wrong = [k for k in ("endpoint", "credentials_file") if getattr(self, k) is not None]
            if wrong:
                raise ValueError(f"{', '.join(wrong)} are for s3:// remotes, not sftp://")
            missing = [k for k in ("identity_file", "known_hosts") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"sftp:// remotes need {' and '.join(missing)} (the key file, and the host's "
                                 "key in a known_hosts file: hosts are never trusted on first use)")
        else:
            raise ValueError(f"url {self.url!r} must start with s3:// or sftp://")
        return self


class EncryptionConfig(_Strict):
    """How backup files are encrypted (age to public recipients, or gpg with a passphrase), and the key that
    signs manifests. Checked at load: with this section present and anything unreadable or invalid, the
    config does not load and no job runs (never a clear-text fallback)."""

    method: Literal["age", "gpg"]
    recipients: list[str] | None = None
    recipients_file: PathValue | None = None
    identity_file: PathValue | None = Field(None, description="age identity; only where restores happen")
    passphrase_file: PathValue | None = Field(None, description="gpg: the passphrase, one line")
    signing_key_file: PathValue | None = Field(None, description="the key of the manifests' HMAC")
    # Filled by the loader from passphrase_file and signing_key_file; never read from the TOML file.
    passphrase: SecretStr | None = Field(None, exclude=True)
    signing_key: SecretStr | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _fits_method(self) -> EncryptionConfig:
        if self.method == "age":
            if (self.recipients is None) == (self.recipients_file is None):
                raise ValueError('method = "age" needs exactly one of recipients = ["age1…"] or recipients_file')
            if self.recipients is not None and not self.recipients:
                raise ValueError("recipients is empty: list at least one age1… or ssh-ed25519 key")
            for recipient in self.recipients or ():
                parse_recipient(recipient)
            if self.passphrase_file is not None:
                raise ValueError('passphrase_file belongs to method = "gpg"; age uses recipients and identity_file')
        else:
            if self.passphrase_file is None:
                raise ValueError('method = "gpg" needs passphrase_file (the passphrase, one line, mode 0600)')
            for name in ("recipients", "recipients_file", "identity_file"):
                if getattr(self, name) is not None:
                    raise ValueError(f'{name} belongs to method = "age"; gpg uses passphrase_file')
        return self

    def load_identities(self) -> list[AgeIdentity]:
        """The age identities of identity_file; raises KeyMissing when it is not set, unreadable, too open or
        not an identity file."""
        if self.identity_file is None:
            raise KeyMissing("no [encryption] identity_file is configured to decrypt age files",
                             hint="set it on the host that restores (the key `kkua-backup key generate` wrote)")
        problems: list[str] = []
        text = _read_secret_file(self.identity_file, "encryption.identity_file", problems)
        if text is None:
            raise KeyMissing(problems[0], hint="restores and verify --restore-test need the age identity")
        try:
            return parse_identities(text.encode("utf-8"), str(self.identity_file))
        except ValueError as exc:
            raise KeyMissing(f"encryption.identity_file: {exc}") from None


class Config(_Strict):
    """The whole effective configuration."""

    backup_dir: PathValue = Path("/var/backups/kkua")
    log_dir: PathValue = Path("/var/log/kkua-backup")
    env_file: PathValue | None = None
    postgres: PostgresConfig = PostgresConfig()
    redis: RedisConfig = RedisConfig()
    retention: RetentionConfig = RetentionConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    restore: RestoreConfig = RestoreConfig()
    daemon: DaemonConfig = DaemonConfig()
    metrics: MetricsConfig = MetricsConfig()
    notify: NotifyConfig = NotifyConfig()
    remote: list[RemoteConfig] = []
    encryption: EncryptionConfig | None = None

    @model_validator(mode="after")
    def _remote_names_unique(self) -> Config:
        names = [r.name for r in self.remote]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"remote names must be unique; {', '.join(twice)} appears more than once")
        return self

    def remote_named(self, name: str) -> RemoteConfig | None:
        """The [[remote]] entry called `name`, if there is one."""
        return next((r for r in self.remote if r.name == name), None)

    @property
    def state_file(self) -> Path:
        """Where the last run of each job is recorded (by whichever runner ran it)."""
        return self.daemon.state_file or self.backup_dir / ".state" / "jobs.json"

    def keys(self, job: str = "gpg") -> Keys:
        """What this host encrypts new backup files with and how it opens encrypted ones."""
        enc = self.encryption
        if enc is None:
            return Keys()
        passphrase = enc.passphrase.get_secret_value().encode("utf-8") if enc.passphrase is not None else None
        signing = bytes.fromhex(enc.signing_key.get_secret_value().strip()) if enc.signing_key is not None else None
        return Keys(method=enc.method, recipients=tuple(enc.recipients or ()), passphrase=passphrase,
                    identities=enc.load_identities if enc.identity_file is not None else None,
                    signing_key=signing, job=job)

    @property
    def trusted_folders(self) -> tuple[Path, ...]:
        """The folders the tool owns: below them nothing is opened through a symlink (docs/security.md)."""
        return (self.backup_dir, self.log_dir, self.state_file.parent)


# The guide's environment variables: name -> (key path, type).
ENV_OVERRIDES: dict[str, tuple[tuple[str, ...], type]] = {
    "DATABASE_HOST": (("postgres", "host"), str),
    "DATABASE_PORT": (("postgres", "port"), int),
    "DATABASE_NAME": (("postgres", "database"), str),
    "DATABASE_USER": (("postgres", "user"), str),
    "REDIS_HOST": (("redis", "host"), str),
    "REDIS_PORT": (("redis", "port"), int),
    "BACKUP_RETENTION_DAYS": (("retention", "days"), int),
    "BACKUP_AOF": (("redis", "aof"), bool),
    "FORCE_RESTORE": (("restore", "force"), bool),
    "TEST_RESTORE": (("postgres", "test_restore"), bool),
}
SECRET_ENV: dict[str, str] = {"DATABASE_PASSWORD": "postgres", "REDIS_PASSWORD": "redis"}
# The notification URLs (secrets too): variable -> key of [notify], read instead of its `<key>_file`.
NOTIFY_ENV: dict[str, str] = {"KKUA_HEALTHCHECKS_URL": "healthchecks_url", "KKUA_WEBHOOK_URL": "webhook_url"}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_ENV_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")


def parse_bool(text: str) -> bool:
    """Read a boolean the way the guide's variables are written; raises ValueError otherwise."""
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def parse_env_file(text: str) -> dict[str, str]:
    """Parse `.env` text as data (KEY=VALUE, optional quotes and `export`); nothing is expanded or run."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _ENV_LINE.match(line)
        if not match:
            continue
        key, value = match.group(1), match.group(2)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
            if raw.strip().split("=", 1)[1].strip()[0] == '"':
                value = value.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
        else:
            value = re.split(r"\s+#", value, maxsplit=1)[0].strip()
        values[key] = value
    return values


def _set_path(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _section_model(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model of the section at `loc` (Config for the top level), or None when it is not a model."""
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _problem_text(err: Any) -> str:
    """One validation error in words a person can act on: an unknown key with the nearest known one, a wrong
    value with the value given."""
    loc: tuple[int | str, ...] = tuple(err["loc"])
    if err["type"] == "extra_forbidden" and loc:
        model = _section_model(loc[:-1])
        known = [name for name, field in model.model_fields.items() if not field.exclude] if model else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        if close:
            return f"unknown key; did you mean `{close[0]}`?"
        return "unknown key" + (f" (known keys here: {', '.join(known)})" if known else "")
    message = str(err["msg"]).removeprefix("Value error, ")
    given = err.get("input")
    if err["type"] != "missing" and not isinstance(given, dict) and f"{given}" not in message:
        message += f"; given: {given!r}"
    return message


class LoadedConfig:
    """The validated config plus where each overridden value came from (for `config check`), and the sha256
    of the config file's bytes it was made from (None: no file; core/status_cache.py keys on it)."""

    def __init__(self, config: Config, path: Path | None, sources: dict[str, str], digest: str | None = None) -> None:
        self.config = config
        self.path = path
        self.sources = sources
        self.digest = digest


def load_config(cli_path: str | None = None, environ: Mapping[str, str] | None = None) -> LoadedConfig:
    """Read, merge and validate the configuration; raises ConfigError listing every problem."""
    env = dict(os.environ if environ is None else environ)
    path, explicit = resolve_config_path(cli_path, env)
    data: dict[str, Any] = {}
    problems: list[str] = []
    sources: dict[str, str] = {}
    where = str(path)
    digest: str | None = None
    try:
        with path.open("rb") as fh:
            content = fh.read()
        digest = hashlib.sha256(content).hexdigest()
        data = tomllib.loads(content.decode())  # what tomllib.load does, on the bytes the digest is of
        for key in data:
            sources[key] = where
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {path} does not exist",
                              hint="create it (see docs/configuration.md) or point --config at it") from None
        used_path: Path | None = None
    except PermissionError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}",
                          hint="run as a user that can read it (root or the kkua-backup group)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    else:
        used_path = path

    for section in ("postgres", "redis"):
        if isinstance(data.get(section), dict) and "password" in data[section]:
            env_name = next(k for k, v in SECRET_ENV.items() if v == section)
            problems.append(f"{section}.password: passwords do not belong in the config file; "
                            f"use {section}.password_file or {env_name} ({where})")
            del data[section]["password"]
    notify = data.get("notify")
    for key in NOTIFY_ENV.values():
        if isinstance(notify, dict) and key in notify:
            env_name = next(k for k, v in NOTIFY_ENV.items() if v == key)
            problems.append(f"notify.{key}: the URL is a secret and does not belong in the config file; "
                            f"use notify.{key}_file or {env_name} ({where})")
            del notify[key]

    # env_file (from the TOML file) then the process environment, the latter winning.
    layered: dict[str, tuple[str, str]] = {}
    env_file = data.get("env_file")
    if isinstance(env_file, str) and env_file:
        env_path = Path(env_file)
        if not env_path.is_absolute() and used_path is not None:
            env_path = used_path.parent / env_path  # relative to the config file, not to where we run
        text = _read_secret_file(env_path, "env_file", problems, where=f" ({where})")
        for key, raw_value in parse_env_file(text or "").items():
            layered[key] = (raw_value, str(env_path))
    for key in (*ENV_OVERRIDES, *SECRET_ENV):
        if key in env:
            layered[key] = (env[key], "environment")

    for name, (keypath, kind) in ENV_OVERRIDES.items():
        if name not in layered:
            continue
        raw, origin = layered[name]
        dotted = ".".join(keypath)
        value: Any = raw
        try:
            if kind is int:
                value = int(raw.strip())
            elif kind is bool:
                value = parse_bool(raw)
        except ValueError:
            expected = "a whole number" if kind is int else "true or false"
            problems.append(f"{dotted} (from {name} in {origin}): expected {expected}, got {raw!r}")
            continue
        _set_path(data, keypath, value)
        sources[dotted] = f"{name} ({origin})"

    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            dotted = _loc(err["loc"])
            origin = sources.get(dotted, where)
            problems.append(f"{dotted}: {_problem_text(err)} ({origin})")
        raise ConfigError(f"invalid configuration in {where}", problems=problems) from None
    if problems:
        raise ConfigError(f"invalid configuration in {where}", problems=problems)

    config = _with_secrets(config, layered, problems, sources)
    config = _with_notify_urls(config, env, problems, sources)
    config = _with_remote_credentials(config, env, problems)
    if config.encryption is not None:
        config = config.model_copy(update={"encryption": _with_keys(config.encryption, problems)})
    if problems:
        raise ConfigError(f"invalid configuration in {where}", problems=problems)
    return LoadedConfig(config, used_path, sources, digest)


def secret_mode_problem(mode: int, path: Path) -> str | None:
    """Why a file holding secrets is too open, with the fix (None when it is fine): as ssh does with keys,
    nobody but its owner and group may write it, and others may not read it."""
    mode = stat.S_IMODE(mode)
    if not mode & 0o026:
        return None
    what = ("writable by group or others" if mode & 0o022 else "readable by others")
    return (f"{path} is {what} (mode {mode:04o}); fix: chmod 600 {path} "
            f"(or chmod 640 {path} and chown root:kkua-backup {path})")


def _read_secret_file(path: Path, dotted: str, problems: list[str], where: str = "") -> str | None:
    """The text of a file holding secrets, or None with a problem noted (unreadable, too open)."""
    try:
        with path.open("r", encoding="utf-8") as fh:
            problem = secret_mode_problem(os.fstat(fh.fileno()).st_mode, path)
            if problem:
                problems.append(f"{dotted}: {problem}{where}")
                return None
            return fh.read()
    except OSError as exc:
        problems.append(f"{dotted}: cannot read {path}: {exc.strerror}{where}")
        return None


def _read_secret(path: Path, dotted: str, problems: list[str]) -> SecretStr | None:
    text = _read_secret_file(path, dotted, problems)
    if text is None:
        return None
    secret = text.rstrip("\r\n")
    if not secret:
        problems.append(f"{dotted}: {path} is empty")
        return None
    return SecretStr(secret)


def _with_secrets(config: Config, layered: dict[str, tuple[str, str]], problems: list[str],
                  sources: dict[str, str]) -> Config:
    updates: dict[str, BaseModel] = {}
    for env_name, section in SECRET_ENV.items():
        model = getattr(config, section)
        secret: SecretStr | None = None
        if env_name in layered and layered[env_name][0]:
            secret = SecretStr(layered[env_name][0])
            sources[f"{section}.password"] = f"{env_name} ({layered[env_name][1]})"
        elif model.password_file is not None:
            secret = _read_secret(model.password_file, f"{section}.password_file", problems)
            sources[f"{section}.password"] = str(model.password_file)
        if secret is not None:
            updates[section] = model.model_copy(update={"password": secret})
    return config.model_copy(update=updates) if updates else config


def _with_notify_urls(config: Config, env: Mapping[str, str], problems: list[str],
                      sources: dict[str, str]) -> Config:
    """[notify]'s URLs from the environment, else from their files (one line, http or https)."""
    updates: dict[str, SecretStr] = {}
    for env_name, key in NOTIFY_ENV.items():
        url: SecretStr | None = None
        if env.get(env_name):
            url = SecretStr(env[env_name].strip())
            sources[f"notify.{key}"] = f"{env_name} (environment)"
        elif (path := getattr(config.notify, f"{key}_file")) is not None:
            url = _read_secret(path, f"notify.{key}_file", problems)
            sources[f"notify.{key}"] = str(path)
        if url is not None:
            if not url.get_secret_value().startswith(("http://", "https://")):
                problems.append(f"notify.{key}: not an http:// or https:// URL ({sources[f'notify.{key}']})")
                continue
            updates[key] = url
    return config.model_copy(update={"notify": config.notify.model_copy(update=updates)}) if updates else config
def _with_remote_credentials(config: Config, env: Mapping[str, str], problems: list[str]) -> Config:
    """S3 remotes get their keys from `credentials_file` (AWS_ACCESS_KEY_ID=..., AWS_SECRET_ACCESS_KEY=...,
    read as data like .env) or else from the environment; a remote without both is a config problem."""
    remotes: list[RemoteConfig] = []
    for index, remote in enumerate(config.remote):
        if remote.scheme != "s3":
            remotes.append(remote)
            continue
        dotted = f"remote.{index}.credentials_file"
        values: Mapping[str, str] = env
        origin = "the environment"
        if remote.credentials_file is not None:
            text = _read_secret_file(remote.credentials_file, dotted, problems)
            if text is None:
                remotes.append(remote)
                continue
            values, origin = parse_env_file(text), str(remote.credentials_file)
        key_id, secret = values.get("AWS_ACCESS_KEY_ID", ""), values.get("AWS_SECRET_ACCESS_KEY", "")
        if not key_id or not secret:
            absent = " and ".join(k for k, v in (("AWS_ACCESS_KEY_ID", key_id), ("AWS_SECRET_ACCESS_KEY", secret))
                                  if not v)
            problems.append(f"remote.{index} ({remote.name}): no {absent} in {origin}; write both into "
                            "credentials_file (mode 0600), or set them in the environment")
            remotes.append(remote)
            continue
        token = values.get("AWS_SESSION_TOKEN") or None
        region = values.get("AWS_REGION") or values.get("AWS_DEFAULT_REGION") or None
        remotes.append(remote.model_copy(update={
            "access_key_id": key_id, "secret_access_key": SecretStr(secret),
            "session_token": SecretStr(token) if token else None, "region": region}))
    return config.model_copy(update={"remote": remotes}) if config.remote else config


def secrets_of(config: Config) -> list[str]:
    """Every secret the config holds (for the log sink to mask)."""
    found = [s.password.get_secret_value() for s in (config.postgres, config.redis) if s.password is not None]
    for remote in config.remote:
        found += [v.get_secret_value() for v in (remote.secret_access_key, remote.session_token) if v is not None]
    found += [url.get_secret_value() for url in (config.notify.healthchecks_url, config.notify.webhook_url)
              if url is not None]
    if config.encryption is not None:
        found += [v.get_secret_value() for v in (config.encryption.passphrase, config.encryption.signing_key)
                  if v is not None]
    return found


SIGNING_KEY_BYTES = 32


def _with_keys(enc: EncryptionConfig, problems: list[str]) -> EncryptionConfig:
    """The encryption section with its recipients, passphrase and signing key read and checked; every
    problem is noted (the config then does not load: fail closed)."""
    update: dict[str, Any] = {}
    if enc.recipients_file is not None:
        text = _read_text(enc.recipients_file, "encryption.recipients_file", problems)
        if text is not None:
            lines = recipient_lines(text)
            if not lines:
                problems.append(f"encryption.recipients_file: {enc.recipients_file} lists no recipient")
            for line in lines:
                try:
                    parse_recipient(line)
                except ValueError as exc:
                    problems.append(f"encryption.recipients_file: {exc} ({enc.recipients_file})")
            update["recipients"] = lines
    if enc.passphrase_file is not None:
        update["passphrase"] = _read_secret(enc.passphrase_file, "encryption.passphrase_file", problems)
    if enc.signing_key_file is not None:
        key = _read_secret(enc.signing_key_file, "encryption.signing_key_file", problems)
        if key is not None:
            try:
                raw = bytes.fromhex(key.get_secret_value().strip())
            except ValueError:
                raw = b""
            if len(raw) < SIGNING_KEY_BYTES:
                problems.append(f"encryption.signing_key_file: {enc.signing_key_file} is not a signing key "
                                f"(expected {SIGNING_KEY_BYTES * 2} hex digits, as `kkua-backup key generate` "
                                "writes)")
            else:
                update["signing_key"] = key
    return enc.model_copy(update=update)


def _read_text(path: Path, dotted: str, problems: list[str]) -> str | None:
    """A file that is not secret but must be readable (recipients), or None with a problem noted."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        problems.append(f"{dotted}: cannot read {path}: {reason}")
        return None


def redacted(config: Config) -> dict[str, Any]:
    """The effective config as plain data with every secret replaced by a marker."""
    data = config.model_dump(mode="json")
    for section in SECRET_ENV.values():
        secret = getattr(config, section).password
        data[section]["password"] = "<redacted>" if secret is not None else None
    for key in NOTIFY_ENV.values():
        data["notify"][key] = "<redacted>" if getattr(config.notify, key) is not None else None
    return data
