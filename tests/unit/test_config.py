"""Config loading: strict validation, every problem at once, the guide's variables, env_file as data."""

from __future__ import annotations

from pathlib import Path

import pytest

from kkua_backupd.config import load_config, parse_bool, parse_env_file, redacted
from kkua_backupd.errors import ConfigError


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return str(path)


def test_defaults_without_a_file_at_the_default_path() -> None:
    loaded = load_config(None, {})
    assert loaded.path is None or loaded.path.exists()
    assert loaded.config.postgres.port == 5432
    assert loaded.config.schedule.retention == "Sun *-*-* 04:00:00"


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config(str(tmp_path / "nope.toml"), {})
    assert info.value.exit_code == 2


def test_all_problems_reported_at_once_with_key_paths(tmp_path: Path) -> None:
    path = write(tmp_path, '[postgres]\nport = "x"\ncolour = 1\nformat = "tar"\n[retention]\ndays = 0\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, {"BACKUP_RETENTION_DAYS": "seven"})
    text = str(info.value)
    for expected in ("postgres.port", "postgres.colour", "postgres.format", "retention.days",
                     "BACKUP_RETENTION_DAYS", path):
        assert expected in text, expected


def test_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[postgres\nport = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path, {})


def test_password_in_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, '[postgres]\npassword = "hunter2"\n')
    with pytest.raises(ConfigError, match="postgres.password: passwords do not belong") as info:
        load_config(path, {})
    assert "hunter2" not in str(info.value)


def test_environment_overrides_file_and_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / "app.env"
    env_file.write_text('DATABASE_HOST=db\nDATABASE_PORT="6543"\nexport TEST_RESTORE=true\n'
                        "DATABASE_PASSWORD='from env file'\nBACKUP_RETENTION_DAYS=9 # comment\n"
                        "UNRELATED=$(rm -rf /)\n")
    env_file.chmod(0o600)  # it holds a password: nobody else may read it
    path = write(tmp_path, f'env_file = "{env_file}"\n[postgres]\nhost = "filehost"\nport = 1111\n')
    loaded = load_config(path, {"DATABASE_PORT": "7777", "FORCE_RESTORE": "yes"})
    cfg = loaded.config
    assert cfg.postgres.host == "db"  # env_file beats the TOML file
    assert cfg.postgres.port == 7777  # the process environment beats env_file
    assert cfg.postgres.test_restore is True
    assert cfg.restore.force is True
    assert cfg.retention.days == 9
    assert cfg.postgres.password is not None
    assert cfg.postgres.password.get_secret_value() == "from env file"
    assert loaded.sources["postgres.port"] == "DATABASE_PORT (environment)"


def test_password_file_is_read_and_redacted(tmp_path: Path) -> None:
    secret = tmp_path / "pg.pass"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    path = write(tmp_path, f'[postgres]\npassword_file = "{secret}"\n')
    cfg = load_config(path, {}).config
    assert cfg.postgres.password is not None
    assert cfg.postgres.password.get_secret_value() == "s3cret"
    shown = redacted(cfg)
    assert shown["postgres"]["password"] == "<redacted>"
    assert "s3cret" not in repr(shown)


def test_unreadable_password_file_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, f'[postgres]\npassword_file = "{tmp_path / "missing.pass"}"\n')
    with pytest.raises(ConfigError, match="postgres.password_file: cannot read"):
        load_config(path, {})


def test_env_file_is_data_not_shell() -> None:
    parsed = parse_env_file("A=1\nB='two words'\nC=\"x\\\"y\"\n# nope\nD=$(whoami)\nnot a line\n")
    assert parsed == {"A": "1", "B": "two words", "C": 'x"y', "D": "$(whoami)"}


@pytest.mark.parametrize(("text", "value"), [("true", True), ("TRUE", True), ("1", True), ("yes", True),
                                             ("false", False), ("0", False), ("", False), ("off", False)])
def test_parse_bool(text: str, value: bool) -> None:
    assert parse_bool(text) is value


def test_parse_bool_rejects_other_text() -> None:
    with pytest.raises(ValueError, match="expected true or false"):
        parse_bool("maybe")


@pytest.mark.parametrize(("compression", "level", "message"), [
    ("gzip", 12, "compression_level must be 1 to 9 for gzip"),
    ("none", 3, "no meaning with compression"),
])
def test_compression_level_must_fit_the_compression(tmp_path: Path, compression: str, level: int,
                                                    message: str) -> None:
    path = write(tmp_path, f'[postgres]\ncompression = "{compression}"\ncompression_level = {level}\n')
    with pytest.raises(ConfigError, match=message):
        load_config(path, {})


def test_relative_env_file_is_next_to_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "app.env").write_text("DATABASE_NAME=from_env_file\n")
    (tmp_path / "app.env").chmod(0o640)
    path = write(tmp_path, 'env_file = "app.env"\n')
    monkeypatch.chdir("/")
    assert load_config(path, {}).config.postgres.database == "from_env_file"
