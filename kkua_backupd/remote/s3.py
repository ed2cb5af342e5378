"""S3 and S3-compatible stores through obstore (the Rust object_store client: no boto3 import cost).

Uploads stream: files up to PART_SIZE go in one PUT, larger ones as a multipart upload of PART_SIZE parts
(10,000 parts reach 640 GiB) with one part in flight, so memory stays near one part. Every request carries
an `x-amz-checksum-sha256` the store checks; after the upload the object's size, and its ETag where it is an
MD5 (single PUT, or the MD5 of the parts' MD5s), are compared with what we sent. An upload is atomic: a
killed multipart upload leaves no object (only a hidden incomplete upload, for the bucket's lifecycle rule).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import obstore
from obstore.exceptions import BaseError, PermissionDeniedError, UnauthenticatedError
from obstore.store import S3Store

from kkua_backupd.config import RemoteConfig
from kkua_backupd.remote import DeleteRefused, PutResult, RemoteError, RemoteObject
from kkua_backupd.safefs import open_file

PART_SIZE = 64 << 20
READ_CHUNK = 8 << 20  # a divisor of PART_SIZE: the part boundaries fall between reads
_MD5_RE = re.compile(r"^[0-9a-f]{32}$")
_MULTI_RE = re.compile(r"^[0-9a-f]{32}-\d+$")


_STATUS_RE = re.compile(r"status code: (\d{3})")
_CODE_RE = re.compile(r"<Code>([^<]{1,80})</Code>")
_MESSAGE_RE = re.compile(r"<Message>([^<]{1,300})</Message>")
_DENIED_CODES = ("AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken")


def _first_line(exc: BaseException) -> str:
    """The store's answer in one line: `HTTP 403 SignatureDoesNotMatch: ...` when it sent one, else the
    client's own first line (a refused connection, a timeout)."""
    text = str(exc).strip().split("\n\nDebug source", 1)[0]
    status, code, message = _STATUS_RE.search(text), _CODE_RE.search(text), _MESSAGE_RE.search(text)
    if status or code:
        return " ".join(part for part in (f"HTTP {status.group(1)}" if status else "",
                                          f"{code.group(1)}:" if code else "",
                                          message.group(1) if message else "") if part).rstrip(":")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines)[:300] or type(exc).__name__


def _denied(exc: BaseException) -> bool:
    """Whether the store refused our credentials or the operation (HTTP 401/403, an S3 access error code)."""
    if isinstance(exc, PermissionDeniedError | UnauthenticatedError):
        return True
    text = str(exc)
    return any(f"status code: {code}" in text for code in (401, 403)) or any(c in text for c in _DENIED_CODES)


def etag_of(raw: str | None) -> str | None:
    """An ETag without its quotes, lower case; None when absent."""
    return raw.strip('"').lower() if raw else None


def multipart_etag(part_digests: list[bytes]) -> str:
    """The ETag S3 gives a multipart upload: the MD5 of the parts' MD5s, a dash, the number of parts."""
    return f"{hashlib.md5(b''.join(part_digests), usedforsecurity=False).hexdigest()}-{len(part_digests)}"


class _Digests:
    """MD5 of a whole file and of each PART_SIZE part, as its chunks go by."""

    def __init__(self) -> None:
        self.whole = hashlib.md5(usedforsecurity=False)
        self.parts: list[bytes] = []
        self._part = hashlib.md5(usedforsecurity=False)
        self._in_part = 0

    def update(self, data: bytes) -> None:
        self.whole.update(data)
        view = memoryview(data)
        while view:
            take = min(len(view), PART_SIZE - self._in_part)
            self._part.update(view[:take])
            self._in_part += take
            view = view[take:]
            if self._in_part == PART_SIZE:
                self.parts.append(self._part.digest())
                self._part, self._in_part = hashlib.md5(usedforsecurity=False), 0

    def etags(self) -> set[str]:
        parts = self.parts + ([self._part.digest()] if self._in_part else [])
        return {self.whole.hexdigest(), multipart_etag(parts)}


class S3Remote:
    """A bucket and prefix of an S3 or S3-compatible store (`endpoint`), keys from the config."""

    def __init__(self, config: RemoteConfig, *, timeout: float = 60.0) -> None:
        self.name = config.name
        self.bucket, self.prefix = config.s3_parts()
        self.endpoint = config.endpoint
        s3: dict[str, Any] = {"region": config.region or "us-east-1", "checksum_algorithm": "sha256"}
        if config.access_key_id and config.secret_access_key:
            s3["access_key_id"] = config.access_key_id
            s3["secret_access_key"] = config.secret_access_key.get_secret_value()
        if config.session_token:
            s3["token"] = config.session_token.get_secret_value()
        if config.endpoint:
            s3["endpoint"] = config.endpoint.rstrip("/")
            s3["virtual_hosted_style_request"] = False
        client: dict[str, Any] = {"connect_timeout": dt.timedelta(seconds=min(timeout, 15)),
                                  "timeout": dt.timedelta(seconds=max(timeout, 600)),
                                  "allow_http": bool(config.endpoint and config.endpoint.startswith("http://"))}
        retry: dict[str, Any] = {"max_retries": 2, "retry_timeout": dt.timedelta(seconds=timeout)}
        self.store = S3Store(self.bucket, prefix=self.prefix or None, config=s3,  # type: ignore[arg-type]
                             client_options=client, retry_config=retry)  # type: ignore[arg-type]

    def describe(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        return f"{where} at {self.endpoint}" if self.endpoint else where

    def _error(self, exc: Exception, action: str) -> RemoteError:
        if _denied(exc):
            return RemoteError(f"remote {self.name} ({self.describe()}) refused {action}: {_first_line(exc)}",
                               hint="check the keys in its credentials_file (or AWS_ACCESS_KEY_ID/"
                                    "AWS_SECRET_ACCESS_KEY) and the bucket's policy")
        return RemoteError(f"remote {self.name} ({self.describe()}): cannot {action}: {_first_line(exc)}",
                           hint="check that the store is reachable and the bucket exists; the local set is kept")

    def put(self, local: Path, key: str, *, size: int, sha256: str) -> PutResult:
        digests = _Digests()
        fd = open_file(local, os.O_RDONLY, root=local.parent)
        try:
            with os.fdopen(fd, "rb", buffering=0) as fh:
                def chunks() -> Iterator[bytes]:
                    while data := fh.read(READ_CHUNK):
                        digests.update(data)
                        yield data
                try:
                    if size <= PART_SIZE:  # one PUT: the file is read once into one buffer (no join of chunks)
                        body = fh.read(size + 1)
                        digests.update(body)
                        result = obstore.put(self.store, key, body, use_multipart=False)
                        del body
                    else:
                        result = obstore.put(self.store, key, chunks(), chunk_size=PART_SIZE, max_concurrency=1)
                except (BaseError, OSError) as exc:
                    raise self._error(exc, f"upload {key}") from None
        except OSError as exc:
            raise RemoteError(f"cannot read {local} to upload it: {exc.strerror or exc}") from None
        found = self.stat(key)
        if found is None or found.size != size:
            raise RemoteError(f"remote {self.name}: {key} holds {found.size if found else 'nothing'} bytes after "
                              f"the upload, not {size}", hint="the store lost or cut the upload; push again")
        checked = "size"
        etag = etag_of(result.get("e_tag"))
        for tag in {etag, etag_of(found.checksum[4:] if found.checksum else None)} - {None}:
            if tag in digests.etags():
                checked = "size+md5"
            elif _MD5_RE.match(tag or ""):
                raise RemoteError(f"remote {self.name}: {key} was stored with MD5 {tag}, which is not the MD5 of "
                                  "the file sent", hint="the bytes were changed on the way; push again")
        return PutResult(key, size, checked)

    def stat(self, key: str) -> RemoteObject | None:
        try:
            meta = obstore.head(self.store, key)
        except FileNotFoundError:
            return None
        except (BaseError, OSError) as exc:
            raise self._error(exc, f"look at {key}") from None
        return self._object(meta)

    @staticmethod
    def _object(meta: Any) -> RemoteObject:
        tag = etag_of(meta.get("e_tag"))
        checksum = f"md5:{tag}" if tag and (_MD5_RE.match(tag) or _MULTI_RE.match(tag)) else None
        return RemoteObject(str(meta["path"]), int(meta["size"]), checksum)

    def sha256(self, key: str) -> str | None:
        return None

    def list(self, folder: str) -> list[RemoteObject]:
        try:
            found = obstore.list_with_delimiter(self.store, prefix=folder.strip("/") + "/")
        except FileNotFoundError:
            return []
        except (BaseError, OSError) as exc:
            raise self._error(exc, f"list {folder}/") from None
        return sorted((self._object(meta) for meta in found["objects"]), key=lambda o: o.key)

    def read(self, key: str) -> Iterator[bytes]:
        try:
            response = obstore.get(self.store, key)
            for chunk in response.stream(min_chunk_size=1 << 20):
                yield bytes(chunk)
        except FileNotFoundError:
            raise RemoteError(f"remote {self.name}: {key} is not there",
                              hint=f"see `kkua-backup list --remote {self.name}`") from None
        except (BaseError, OSError) as exc:
            raise self._error(exc, f"download {key}") from None

    def close(self) -> None:
        """Nothing to let go: obstore's HTTP connections go with the store."""

    def delete(self, key: str) -> None:
        try:
            obstore.delete(self.store, key)
        except FileNotFoundError:
            return
        except (BaseError, OSError) as exc:
            if _denied(exc):
                raise DeleteRefused(f"remote {self.name} refused to delete {key}: {_first_line(exc)}") from None
            raise self._error(exc, f"delete {key}") from None
