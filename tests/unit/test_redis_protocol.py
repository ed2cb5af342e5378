"""Pure parts of the Redis backup: RDB headers and versions, RESP encoding, the diskless end mark,
INFO parsing, redis.conf rendering with secrets redacted, AOF manifests, key-count comparison."""

from __future__ import annotations

import gzip
import socket
import threading
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from kkua_backupd.config import RedisConfig
from kkua_backupd.errors import ConnectionFailed, IntegrityError, JobError, StepTimeout
from kkua_backupd.sources.redis.backup import (
    aof_manifest_files,
    compare_counts,
    conf_value,
    memory_document,
    render_config,
)
from kkua_backupd.sources.redis.protocol import (
    _exactly,
    _Reader,
    _refusal,
    _until_mark,
    command,
    connection_error,
    key_counts,
    keyspace,
    max_rdb_version,
)
from kkua_backupd.sources.redis.rdb import file_header, parse_header


def test_rdb_header_and_version() -> None:
    assert parse_header(b"REDIS0011\xfa\x09redis-ver") == ("REDIS", 11)
    assert parse_header(b"VALKEY080") == ("VALKEY", 80)
    with pytest.raises(IntegrityError, match="not an RDB file"):
        parse_header(b"PK\x03\x04 zip")
    with pytest.raises(IntegrityError, match="only 4 bytes"):
        parse_header(b"REDI")


def test_rdb_version_of_compressed_file(tmp_path: Path) -> None:
    path = tmp_path / "x.rdb.gz"
    path.write_bytes(gzip.compress(b"REDIS0010" + b"\x00" * 1000))
    assert file_header(path) == ("REDIS", 10)
    (tmp_path / "y.rdb").write_bytes(b"REDIS0012\xff")
    assert file_header(tmp_path / "y.rdb") == ("REDIS", 12)


@pytest.mark.parametrize(("server", "rdb"), [("5.0.14", 9), ("6.0.20", 9), ("6.2.14", 9), ("7.0.15", 10),
                                             ("7.2.4", 11), ("7.4.1", 12), ("8.0.2", 12), ("8.4.0", 12),
                                             ("8.6.0", 13), ("4.0.9", 8), ("2.8.24", 6)])
def test_max_rdb_version(server: str, rdb: int) -> None:
    assert max_rdb_version(server) == rdb


def test_max_rdb_version_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="not a Redis version"):
        max_rdb_version("unknown")


def test_resp_command_is_binary_safe() -> None:
    assert command("AUTH", "a b\"c") == b"*2\r\n$4\r\nAUTH\r\n$5\r\na b\"c\r\n"
    assert command("REPLCONF", "capa", "eof") == b"*3\r\n$8\r\nREPLCONF\r\n$4\r\ncapa\r\n$3\r\neof\r\n"


def test_keyspace_from_parsed_info() -> None:
    info = {"db0": {"keys": 5, "expires": 1, "avg_ttl": 3}, "db12": {"keys": 2, "expires": 0, "avg_ttl": 0},
            "db3": {"keys": 7, "expires": 7, "avg_ttl": 9}, "used_memory": 10}
    assert keyspace(info) == {"0": {"keys": 5, "expires": 1}, "3": {"keys": 7, "expires": 7},
                              "12": {"keys": 2, "expires": 0}}
    assert key_counts(info) == {"0": 5, "3": 7, "12": 2}


def _reader_with(payload_parts: list[bytes], timeout: float = 5) -> tuple[_Reader, threading.Thread]:
    """A reader on one end of a real socket pair; the other end sends the parts, then closes."""
    ours, theirs = socket.socketpair()

    def send() -> None:
        for part in payload_parts:
            theirs.sendall(part)
            time.sleep(0.01)  # let each part arrive as its own recv, so splits are exercised
        theirs.close()

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    return _Reader(ours, time.monotonic() + timeout, timeout, "Redis at test:1"), sender


def test_eof_mark_split_across_reads_is_not_part_of_the_rdb() -> None:
    mark = b"0123456789abcdef0123456789abcdef01234567"
    rdb = b"REDIS0010" + bytes(range(256)) * 50
    reader, sender = _reader_with([rdb[:100], rdb[100:] + mark[:17], mark[17:]])
    out = bytearray()
    assert _until_mark(reader, mark, out.extend, "Redis at test:1") == len(rdb)
    assert bytes(out) == rdb
    sender.join()


def test_eof_mark_found_in_reads_smaller_than_the_mark() -> None:
    # Reads shorter than the 39 bytes held back: the held bytes overlap where they move to, and the mark
    # arrives in pieces; bytes already buffered after the header line are read first.
    mark = b"0123456789abcdef0123456789abcdef01234567"
    rdb = b"REDIS0011" + bytes(range(256)) * 3
    stream = b"$EOF:" + mark + b"\r\n" + rdb + mark
    parts = [stream[:60]] + [stream[i:i + 7] for i in range(60, len(stream), 7)]
    reader, sender = _reader_with(parts)
    assert reader.line() == b"$EOF:" + mark
    out = bytearray()
    sizes: list[int] = []

    def sink(data: bytes) -> None:
        assert isinstance(data, bytes)  # never a view of the reused buffer
        sizes.append(len(data))
        out.extend(data)

    assert _until_mark(reader, mark, sink, "Redis at test:1") == len(rdb)
    assert bytes(out) == rdb
    assert len(sizes) > 10, sizes
    sender.join()


def test_eof_transfer_cut_short_fails_clearly() -> None:
    mark = b"x" * 40
    reader, sender = _reader_with([b"REDIS0010" + b"y" * 500])
    with pytest.raises(JobError, match="closed the connection after 509 bytes, before the end"):
        _until_mark(reader, mark, lambda _: None, "Redis at test:1")
    sender.join()


def test_length_transfer_short_read_and_keepalive_lines() -> None:
    reader, sender = _reader_with([b"\n", b"\n", b"$20\r\nREDIS0010"])
    assert reader.line() == b""
    assert reader.line() == b""
    assert reader.line() == b"$20"
    with pytest.raises(JobError, match="after 9 of 20 RDB bytes"):
        _exactly(reader, 20, lambda _: None, "Redis at test:1")
    sender.join()


def test_reader_deadline() -> None:
    ours, theirs = socket.socketpair()
    reader = _Reader(ours, time.monotonic() + 0.2, 0.2, "Redis at test:1")
    with pytest.raises(StepTimeout, match="timed out after 0 s"):
        reader.line()
    theirs.close()
    ours.close()


def test_refusals_that_mean_no_sync() -> None:
    assert _refusal("R", "SYNC", "-NOPERM this user has no permissions to run the 'sync' command") is not None
    assert _refusal("R", "SYNC", "-ERR unknown command 'SYNC', with args beginning with: ") is not None
    assert _refusal("R", "SYNC", "-ERR Can't SYNC while not connected with my master") is None


def test_connection_errors_are_one_actionable_line() -> None:
    import redis

    cfg = RedisConfig(host="db.example", port=6390, username="backup").model_copy(
        update={"password": SecretStr("x")})
    down = connection_error(cfg, redis.ConnectionError("Error 111 connecting to db.example:6390. Connection refused."))
    assert isinstance(down, ConnectionFailed)
    assert str(down).startswith("cannot reach Redis at db.example:6390: Connection refused; is redis-server running")
    wrong = connection_error(cfg, redis.AuthenticationError("invalid username-password pair or user is disabled."))
    assert "refused the password of user 'backup'" in str(wrong) and "password_file" in str(wrong)
    from redis.exceptions import NoPermissionError

    denied = connection_error(cfg, NoPermissionError("this user has no permissions to run the 'config|get' command"))
    assert "may not run CONFIG|GET" in str(denied) and "ACL SETUSER backup" in str(denied)
    slow = connection_error(cfg, redis.TimeoutError("Timeout connecting to server"))
    assert "did not answer in time" in str(slow)
    for err in (down, wrong, denied, slow):
        assert "\n" not in str(err)


def test_conf_value_quoting() -> None:
    assert conf_value("yes") == "yes"
    assert conf_value("") == '""'
    assert conf_value("3600 1 300 100") == '"3600 1 300 100"'
    assert conf_value(b'a"b\\c\n\x01') == '"a\\"b\\\\c\\n\\x01"'
    assert conf_value("/var/lib/redis") == "/var/lib/redis"


def test_render_config_redacts_every_secret() -> None:
    text = render_config({"requirepass": "s3cret!", "masterauth": b"other-secret", "tls-key-file-pass": "kp",
                          "port": "6379", "save": "3600 1", "masteruser": "repl", "notify-keyspace-events": ""},
                         acl=["user default on #" + "a" * 64 + " ~* &* +@all", "user app on >plain ~app:* +@read"],
                         header=["test"])
    for secret in ("s3cret!", "other-secret", "kp\n", "a" * 64, "plain"):
        assert secret not in text
    lines = text.splitlines()
    assert "port 6379" in lines and 'save "3600 1"' in lines and "masteruser repl" in lines
    assert 'notify-keyspace-events ""' in lines
    assert any(line.startswith("# requirepass <redacted>") for line in lines)
    assert "# user default on <redacted> ~* &* +@all" in lines
    assert "# user app on <redacted> ~app:* +@read" in lines


def test_memory_document_is_json_ready() -> None:
    import json

    info = {"redis_version": "7.0.15", "used_memory": 1000, "mem_fragmentation_ratio": 1.5,
            "db0": {"keys": 3, "expires": 1, "avg_ttl": 5}, "rdb_last_bgsave_status": "ok"}
    doc = json.loads(json.dumps(memory_document(info, None, "2026-01-01T00:00:00+00:00")))
    assert doc["keyspace"] == {"0": {"keys": 3, "expires": 1}} and doc["total_keys"] == 3
    assert doc["server"]["redis_version"] == "7.0.15" and doc["memory"]["used_memory"] == 1000
    assert memory_document(None, "NOPERM", "t")["error"] == "NOPERM"


def test_aof_manifest_lines() -> None:
    text = ("file appendonly.aof.1.base.rdb seq 1 type b\n"
            "file appendonly.aof.1.incr.aof seq 1 type h\n"
            "file \"append only.aof.2.incr.aof\" seq 2 type i\n")
    assert aof_manifest_files(text) == [("appendonly.aof.1.base.rdb", "b"), ("appendonly.aof.1.incr.aof", "h"),
                                        ("append only.aof.2.incr.aof", "i")]


def test_compare_counts_allows_only_expired_keys_missing() -> None:
    assert compare_counts({"0": 10, "2": 5}, {"0": 3}, {"0": 8, "2": 5}) == []
    assert compare_counts({"0": 10}, {"0": 1}, {"0": 8}) == ["db0: 8 keys, expected 10"]
    assert compare_counts({"0": 10}, {}, {"0": 10, "1": 1}) == ["db1: 1 keys, expected 0"]
