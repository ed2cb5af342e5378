"""[encryption] in the config: checked strictly at load, failing closed (exit 2, no job runs) when the
recipients, passphrase or signing key cannot be read or are not valid."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kkua_backupd.config import RemoteConfig, load_config
from kkua_backupd.core import health
from kkua_backupd.errors import ConfigError, KeyMissing
from kkua_backupd.stream.encrypt import generate_identity


@pytest.fixture(scope="module")
def key() -> tuple[str, str]:
    return generate_identity()


def load(tmp_path: Path, section: str) -> object:
    path = tmp_path / "config.toml"
    path.write_text(f'backup_dir = "{tmp_path}/b"\n[encryption]\n{section}\n')
    return load_config(str(path), {}).config


def secret(tmp_path: Path, name: str, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_text(text)
    os.chmod(path, mode)
    return path


def problems(tmp_path: Path, section: str) -> str:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, section)
    assert err.value.exit_code == 2
    return str(err.value)


def test_age_with_inline_recipients(tmp_path: Path, key: tuple[str, str]) -> None:
    config = load(tmp_path, f'method = "age"\nrecipients = ["{key[1]}"]')
    keys = config.keys()  # type: ignore[attr-defined]
    assert keys.method == "age" and keys.recipients == (key[1],) and keys.extension == ".age"
    assert keys.record() == {"method": "age", "recipients": [key[1]]}


def test_age_with_a_recipients_file(tmp_path: Path, key: tuple[str, str]) -> None:
    other = generate_identity()[1]
    path = tmp_path / "recipients.txt"
    path.write_text(f"# offsite key\n{key[1]}\n\n{other}\n")
    config = load(tmp_path, f'method = "age"\nrecipients_file = "{path}"')
    assert config.keys().recipients == (key[1], other)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("section", "expected"), [
    ('method = "age"', "exactly one of recipients"),
    ('method = "age"\nrecipients = []', "recipients is empty"),
    ('method = "age"\nrecipients = ["age1notakey"]', "not a valid age recipient"),
    ('method = "age"\nrecipients = ["AGE-SECRET-KEY-1QQQ"]', "is not an age recipient"),
    ('method = "rot13"', "encryption.method"),
    ('method = "gpg"', "needs passphrase_file"),
    ('recipients = ["x"]', "encryption.method"),
    ('method = "age"\nrecipients = ["x"]\ncolour = 1', "encryption.colour"),
])
def test_bad_sections_fail_closed(tmp_path: Path, section: str, expected: str) -> None:
    assert expected in problems(tmp_path, section)


def test_unreadable_or_invalid_recipients_file_fails_closed(tmp_path: Path, key: tuple[str, str]) -> None:
    text = problems(tmp_path, f'method = "age"\nrecipients_file = "{tmp_path}/absent.txt"')
    assert "encryption.recipients_file: cannot read" in text
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{key[1]}\nage1broken\n")
    assert "not a valid age recipient" in problems(tmp_path, f'method = "age"\nrecipients_file = "{bad}"')
    empty = tmp_path / "empty.txt"
    empty.write_text("# nobody\n")
    assert "lists no recipient" in problems(tmp_path, f'method = "age"\nrecipients_file = "{empty}"')


def test_age_and_gpg_keys_do_not_mix(tmp_path: Path, key: tuple[str, str]) -> None:
    pw = secret(tmp_path, "pass", "pw\n")
    assert "belongs to method" in problems(tmp_path, f'method = "age"\nrecipients = ["{key[1]}"]\n'
                                                      f'passphrase_file = "{pw}"')
    assert "belongs to method" in problems(tmp_path, f'method = "gpg"\npassphrase_file = "{pw}"\n'
                                                      f'recipients = ["{key[1]}"]')


def test_gpg_passphrase_file(tmp_path: Path) -> None:
    pw = secret(tmp_path, "pass", "s3cret words\n")
    config = load(tmp_path, f'method = "gpg"\npassphrase_file = "{pw}"')
    keys = config.keys()  # type: ignore[attr-defined]
    assert keys.passphrase == b"s3cret words" and keys.extension == ".gpg"
    assert "s3cret" not in repr(config) and "s3cret" not in str(keys.record())
    os.chmod(pw, 0o644)
    assert "readable by others" in problems(tmp_path, f'method = "gpg"\npassphrase_file = "{pw}"')
    assert "cannot read" in problems(tmp_path, f'method = "gpg"\npassphrase_file = "{tmp_path}/none"')


def test_signing_key_file(tmp_path: Path, key: tuple[str, str]) -> None:
    good = secret(tmp_path, "sign.key", "ab" * 32 + "\n")
    config = load(tmp_path, f'method = "age"\nrecipients = ["{key[1]}"]\nsigning_key_file = "{good}"')
    assert config.encryption.signing_key.get_secret_value().strip() == "ab" * 32  # type: ignore[attr-defined]
    short = secret(tmp_path, "short.key", "abcd\n")
    assert "is not a signing key" in problems(tmp_path, f'method = "age"\nrecipients = ["{key[1]}"]\n'
                                                         f'signing_key_file = "{short}"')


def test_identity_is_read_only_when_a_file_is_opened(tmp_path: Path, key: tuple[str, str]) -> None:
    ident = tmp_path / "age.key"
    config = load(tmp_path, f'method = "age"\nrecipients = ["{key[1]}"]\nidentity_file = "{ident}"')
    keys = config.keys()  # type: ignore[attr-defined]  # loads although the identity does not exist yet
    with pytest.raises(KeyMissing, match="cannot read") as err:
        keys.reader("age", "x.age")
    assert err.value.exit_code == 2
    secret(tmp_path, "age.key", key[0], 0o644)
    with pytest.raises(KeyMissing, match="readable by others"):
        keys.reader("age", "x.age")
    os.chmod(ident, 0o600)
    assert keys.reader("age", "x.age") is not None
    no_identity = load(tmp_path, f'method = "age"\nrecipients = ["{key[1]}"]').keys()  # type: ignore[attr-defined]
    with pytest.raises(KeyMissing, match="no identity is configured"):
        no_identity.reader("age", "x.age")
    with pytest.raises(KeyMissing, match="no passphrase_file"):
        no_identity.reader("gpg", "x.gpg")


# --- `kkua-backup check`'s encryption lines ----------------------------------------------------------------------


def encryption_lines(config: object) -> dict[str, tuple[str, str]]:
    results = health.run_checks(config, [health.check_encryption])  # type: ignore[arg-type]
    return {r.name: (r.level, r.message) for r in results}


def test_check_encryption_says_what_the_host_can_do(tmp_path: Path, key: tuple[str, str]) -> None:
    identity = secret(tmp_path, "age.key", key[0])
    signing = secret(tmp_path, "signing.key", os.urandom(32).hex() + "\n")
    config = load(tmp_path, f'method = "age"\nrecipients = ["{key[1]}"]\nidentity_file = "{identity}"\n'
                            f'signing_key_file = "{signing}"')
    lines = encryption_lines(config)
    assert lines == {"encryption": ("OK", "age to 1 recipient(s)"),
                     "encryption.identity_file": ("OK", f"{identity} holds 1 identity(ies)"),
                     "encryption.signing_key_file": ("OK", f"manifests are signed ({signing})")}

    identity.unlink()  # the identity is read by check (a backup never needs it): gone is a failure
    lines = encryption_lines(config)
    assert lines["encryption.identity_file"][0] == "FAIL" and "cannot read" in lines["encryption.identity_file"][1]
    assert health.exit_code(health.run_checks(config, [health.check_encryption])) == 2  # type: ignore[arg-type]

    secret(tmp_path, "age.key", generate_identity()[0])  # readable, but not the key of the recipient
    level, message = encryption_lines(config)["encryption.identity_file"]
    assert level == "WARN" and "not the key of any configured recipient" in message


def test_check_encryption_warns_without_signing_key_or_encryption(tmp_path: Path, key: tuple[str, str]) -> None:
    config = load(tmp_path, f'method = "age"\nrecipients = ["{key[1]}"]')
    lines = encryption_lines(config)
    assert lines["encryption.identity_file"] == ("OK", "not set: this host can make encrypted backups but not "
                                                       "restore or test-restore them")
    assert lines["encryption.signing_key_file"][0] == "WARN"
    assert "cannot be proven" in lines["encryption.signing_key_file"][1]

    pass_file = secret(tmp_path, "gpg.pass", "a passphrase\n")
    lines = encryption_lines(load(tmp_path, f'method = "gpg"\npassphrase_file = "{pass_file}"'))
    assert lines["encryption"] == ("OK", f"gpg (AES256), passphrase read from {pass_file}")

    path = tmp_path / "plain.toml"
    path.write_text(f'backup_dir = "{tmp_path}/b"\n')
    plain = load_config(str(path), {}).config
    assert encryption_lines(plain) == {"encryption": ("OK", "off: backup files are stored unencrypted")}
    remote = RemoteConfig(name="box", url="sftp://u@127.0.0.1/srv", identity_file=tmp_path / "k",
                          known_hosts=tmp_path / "kh")
    level, message = encryption_lines(plain.model_copy(update={"remote": [remote]}))["encryption"]
    assert level == "WARN" and "on 1 remote(s)" in message
