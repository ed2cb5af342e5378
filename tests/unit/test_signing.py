"""Signed manifests (store/signing.py): a MAC over the set's files that any change breaks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kkua_backupd.errors import IntegrityError
from kkua_backupd.store.signing import check_signature, sign
from kkua_backupd.store.storage import Manifest, ManifestFile, base_manifest, read_manifest, write_manifest

KEY = bytes(range(32))


def manifest() -> Manifest:
    import datetime as dt
    created = dt.datetime(2026, 11, 29, 2, 0, tzinfo=dt.timezone(dt.timedelta(hours=9)))
    base = base_manifest("postgres", "backup", "kkua_backup_", "20261129_020000", created)
    return Manifest(**base, files=[ManifestFile(name="kkua_backup_20261129_020000.sql.zst.age", size=123,
                                                sha256="ab" * 32, compression="zstd", encryption="age")],
                    encryption={"method": "age", "recipients": ["age1xyz"]})


def test_signed_manifest_checks_and_survives_a_write_and_read(tmp_path: Path) -> None:
    signed = sign(manifest(), KEY)
    assert check_signature(signed, KEY, required=True) == "ok"
    folder = tmp_path / "postgres"
    folder.mkdir()
    write_manifest(folder, signed)
    again = read_manifest(folder / "kkua_backup_20261129_020000.manifest.json")
    assert check_signature(again, KEY, required=True) == "ok"
    # status is not signed: verify may mark a set failed without breaking its signature
    assert check_signature(again.model_copy(update={"status": "failed"}), KEY, required=True) == "ok"


@pytest.mark.parametrize("change", ["size", "sha256", "name", "encryption", "recipients", "id", "extra file"])
def test_any_change_breaks_the_signature(change: str) -> None:
    signed = sign(manifest(), KEY)
    file = signed.files[0]
    if change == "size":
        forged = signed.model_copy(update={"files": [file.model_copy(update={"size": 124})]})
    elif change == "sha256":
        forged = signed.model_copy(update={"files": [file.model_copy(update={"sha256": "cd" * 32})]})
    elif change == "name":
        forged = signed.model_copy(update={"files": [file.model_copy(update={"name": file.name + "x"})]})
    elif change == "encryption":
        forged = signed.model_copy(update={"files": [file.model_copy(update={"encryption": None})]})
    elif change == "recipients":
        forged = signed.model_copy(update={"encryption": {"method": "age", "recipients": ["age1attacker"]}})
    elif change == "id":
        forged = signed.model_copy(update={"id": "20261130_020000"})
    else:
        forged = signed.model_copy(update={"files": [file, file.model_copy(update={"name": "x"})]})
    with pytest.raises(IntegrityError, match="signature does not match"):
        check_signature(forged, KEY, required=False)


def test_another_key_does_not_verify() -> None:
    with pytest.raises(IntegrityError, match="signature does not match"):
        check_signature(sign(manifest(), KEY), os.urandom(32), required=False)


def test_unsigned_or_unverifiable_sets() -> None:
    plain = manifest()
    assert check_signature(plain, KEY, required=False) == "unsigned"
    with pytest.raises(IntegrityError, match="carries no signature"):
        check_signature(plain, KEY, required=True)
    signed = sign(plain, KEY)
    assert check_signature(signed, None, required=False) == "no key"
    with pytest.raises(IntegrityError, match="no signing_key_file"):
        check_signature(signed, None, required=True)
    odd = signed.model_copy(update={"mac": {"algorithm": "md5", "value": "x"}})
    with pytest.raises(IntegrityError, match="does not know"):
        check_signature(odd, KEY, required=False)
