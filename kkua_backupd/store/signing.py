"""Manifests signed by the hosts: an HMAC-SHA256 over what a set is (its kind, type, name and date, how it
is encrypted, and each file's name, size, sha256, role and compression), made with a key kept on the hosts
(`[encryption] signing_key_file`, never stored with the backups or on a remote).

The recipient of an age backup is public, so whoever can write the backup folder or a remote can also
encrypt a crafted dump to it and write a manifest with the right sha256s; only the MAC tells a set this
tool's hosts made from such a one. It is checked before any byte of a set is restored.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from kkua_backupd.errors import IntegrityError
from kkua_backupd.store.storage import Manifest

MAC_ALGORITHM = "hmac-sha256"
_DOMAIN = "kkua-backupd manifest v1"


def signed_content(manifest: Manifest) -> bytes:
    """The bytes the MAC covers: a canonical JSON of the manifest's identity and files (not its status,
    which verify may change to failed, nor details, timings or host)."""
    body: dict[str, Any] = {
        "domain": _DOMAIN,
        "kind": manifest.kind,
        "type": manifest.type,
        "prefix": manifest.prefix,
        "id": manifest.id,
        "created_at": manifest.created_at.isoformat(),
        "encryption": manifest.encryption,
        "files": [{"name": f.name, "size": f.size, "sha256": f.sha256, "role": f.role,
                   "compression": f.compression, "encryption": f.encryption} for f in manifest.files],
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sign(manifest: Manifest, key: bytes | None) -> Manifest:
    """The manifest with its `mac` set (unchanged without a key)."""
    if key is None:
        return manifest
    mac = hmac.new(key, signed_content(manifest), hashlib.sha256).hexdigest()
    return manifest.model_copy(update={"mac": {"algorithm": MAC_ALGORITHM, "value": mac}})


def check_signature(manifest: Manifest, key: bytes | None, *, required: bool) -> str:
    """Check a manifest's MAC with `key`; returns what was found ("ok", "unsigned", "no key"). Raises
    IntegrityError when the MAC does not match (the set was changed or made elsewhere), when `required` and
    the set carries none, or when `required` and this host has no key to check it with."""
    name = f"{manifest.prefix}{manifest.id}"
    mac = manifest.mac
    if mac is None:
        if required:
            raise IntegrityError(f"set {name} carries no signature, so nothing shows it was made by this tool's "
                                 "hosts; nothing was restored", hint="restore only sets made with "
                                 "[encryption] signing_key_file set")
        return "unsigned"
    if key is None:
        if required:
            raise IntegrityError(f"set {name} is signed but no signing_key_file is configured to check it; "
                                 "nothing was restored", hint="set [encryption] signing_key_file to the hosts' key")
        return "no key"
    value = mac.get("value") if isinstance(mac, dict) else None
    if not isinstance(mac, dict) or mac.get("algorithm") != MAC_ALGORITHM or not isinstance(value, str):
        raise IntegrityError(f"set {name} carries a signature this version does not know ({mac!r})",
                             hint="use a newer kkua-backup, or another set")
    expected = hmac.new(key, signed_content(manifest), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, value):
        raise IntegrityError(f"set {name}: its signature does not match (the manifest was changed, or the set was "
                             "not made by a host holding this signing key); nothing was restored",
                             hint="use another set; find out who wrote this one")
    return "ok"
