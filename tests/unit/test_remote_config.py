"""[[remote]] entries: strict validation with errors that name the key, S3 keys read from a credentials file
or the environment and never shown, and the pure parts of the remotes (S3 ETags, ssh command lines)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from kkua_backupd.config import load_config, redacted, secrets_of
from kkua_backupd.errors import ConfigError
from kkua_backupd.remote.s3 import PART_SIZE, _Digests, multipart_etag
from kkua_backupd.remote.ssh import rsync_argv, ssh_argv

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'backup_dir = "{tmp_path}/b"\nlog_dir = "{tmp_path}/l"\n' + body)
    return path


def creds(tmp_path: Path, text: str = f"AWS_ACCESS_KEY_ID=AKIAEXAMPLE\nAWS_SECRET_ACCESS_KEY={SECRET}\n",
          mode: int = 0o600) -> Path:
    path = tmp_path / "s3.env"
    path.write_text(text)
    path.chmod(mode)
    return path


def problems(tmp_path: Path, body: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(str(write(tmp_path, body)), env or {})
    return caught.value.problems


def test_s3_remote_reads_its_keys_from_the_credentials_file(tmp_path: Path) -> None:
    path = creds(tmp_path, f"AWS_ACCESS_KEY_ID=AKIAEXAMPLE\nAWS_SECRET_ACCESS_KEY={SECRET}\nAWS_REGION=eu-west-1\n")
    loaded = load_config(str(write(tmp_path, f'[[remote]]\nname = "offsite"\nurl = "s3://my-bucket/kkua/x"\n'
                                              f'endpoint = "http://127.0.0.1:9000"\ncredentials_file = "{path}"\n'
                                              "keep_last = 5\ndays = 60\n")), {})
    [remote] = loaded.config.remote
    assert (remote.access_key_id, remote.region, remote.keep_last, remote.days) == ("AKIAEXAMPLE", "eu-west-1", 5, 60)
    assert remote.s3_parts() == ("my-bucket", "kkua/x")
    assert SECRET in secrets_of(loaded.config)
    shown = str(redacted(loaded.config))
    assert SECRET not in shown and "AKIAEXAMPLE" not in shown


def test_s3_remote_falls_back_to_the_environment(tmp_path: Path) -> None:
    body = '[[remote]]\nname = "offsite"\nurl = "s3://my-bucket"\n'
    loaded = load_config(str(write(tmp_path, body)),
                         {"AWS_ACCESS_KEY_ID": "AKIAENV", "AWS_SECRET_ACCESS_KEY": SECRET})
    assert loaded.config.remote[0].access_key_id == "AKIAENV"
    [problem] = problems(tmp_path, body)
    assert "no AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment" in problem


def test_credentials_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = creds(tmp_path, mode=0o644)
    [problem] = problems(tmp_path, f'[[remote]]\nname = "o"\nurl = "s3://my-bucket"\ncredentials_file = "{path}"\n')
    assert problem.startswith("remote.0.credentials_file:") and "readable by others" in problem
    half = creds(tmp_path, "AWS_ACCESS_KEY_ID=A\n")
    [problem] = problems(tmp_path, f'[[remote]]\nname = "o"\nurl = "s3://my-bucket"\ncredentials_file = "{half}"\n')
    assert "no AWS_SECRET_ACCESS_KEY" in problem and SECRET not in problem


def test_sftp_remote_parts(tmp_path: Path) -> None:
    body = ('[[remote]]\nname = "box"\nurl = "sftp://backup@db-2.example:2222/srv/kkua/"\n'
            'identity_file = "/etc/kkua-backup/id_ed25519"\nknown_hosts = "/etc/kkua-backup/known_hosts"\n')
    loaded = load_config(str(write(tmp_path, body)), {})
    remote = loaded.config.remote[0]
    assert remote.sftp_parts() == ("backup", "db-2.example", 2222, "/srv/kkua")
    argv = ssh_argv(remote, "true", timeout=10)
    assert argv[argv.index("-p") + 1] == "2222" and "StrictHostKeyChecking=yes" in argv and "BatchMode=yes" in argv
    assert "UserKnownHostsFile=/etc/kkua-backup/known_hosts" in argv
    assert argv[-3:] == ("backup@db-2.example", "--", "true")
    rsync = rsync_argv(remote, Path("/b/postgres/f.sql.gz"), "/srv/kkua/postgres/f.sql.gz.partial", timeout=10)
    assert rsync[-1] == "backup@db-2.example:/srv/kkua/postgres/f.sql.gz.partial"
    assert "IdentitiesOnly=yes" in rsync[rsync.index("-e") + 1]


@pytest.mark.parametrize(("body", "expected"), [
    ('url = "ftp://host/x"', "must start with s3:// or sftp://"),
    ('url = "s3://Bad_Bucket/x"', "is not s3://BUCKET/PREFIX"),
    ('url = "s3://bucket/../x"', "no '..'"),
    ('url = "sftp://host/x"', "is not sftp://USER@HOST[:PORT]/ABSOLUTE/PATH"),
    ('url = "sftp://u@host:99999/x"\nidentity_file = "/k"\nknown_hosts = "/h"', "is not sftp://"),
    ('url = "sftp://u@host/x"', "need identity_file and known_hosts"),
    ('url = "sftp://u@host/x"\nidentity_file = "/k"\nknown_hosts = "/h"\nendpoint = "http://x:1"', "for s3://"),
    ('url = "s3://bucket"\nknown_hosts = "/h"', "for sftp:// remotes"),
    ('url = "s3://bucket"\nendpoint = "127.0.0.1:9000"', "is not http(s)://HOST[:PORT]"),
    ('url = "s3://bucket"\nkeep_last = 0', "keep_last"),
    ('url = "s3://bucket"\nbucket = "x"', "remote.0.bucket: unknown key"),
])
def test_bad_remote_entries_name_the_key(tmp_path: Path, body: str, expected: str) -> None:
    found = problems(tmp_path, f'[[remote]]\nname = "offsite"\n{body}\n',
                     {"AWS_ACCESS_KEY_ID": "A", "AWS_SECRET_ACCESS_KEY": SECRET})
    assert any(expected in p and p.startswith("remote.0") for p in found), found


def test_remote_names_are_plain_and_unique(tmp_path: Path) -> None:
    env = {"AWS_ACCESS_KEY_ID": "A", "AWS_SECRET_ACCESS_KEY": SECRET}
    [problem] = problems(tmp_path, '[[remote]]\nname = "Off site"\nurl = "s3://bucket"\n', env)
    assert problem.startswith("remote.0.name:")
    found = problems(tmp_path, '[[remote]]\nname = "a"\nurl = "s3://bucket"\n[[remote]]\nname = "a"\nurl = "s3://b2b"\n',
                     env)
    assert any("a appears more than once" in p for p in found)


def test_multipart_etag_is_the_md5_of_the_parts_md5s() -> None:
    data = bytes(range(256)) * ((PART_SIZE + 1000) // 256)
    digests = _Digests()
    for start in range(0, len(data), 3 << 20):  # chunk sizes that do not divide the part size
        digests.update(data[start:start + (3 << 20)])
    parts = [hashlib.md5(part, usedforsecurity=False).digest() for part in (data[:PART_SIZE], data[PART_SIZE:])]
    assert digests.etags() == {hashlib.md5(data, usedforsecurity=False).hexdigest(), multipart_etag(parts)}
    assert multipart_etag(parts).endswith("-2")
