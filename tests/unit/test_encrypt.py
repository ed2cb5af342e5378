"""The encryption stage (stream/encrypt.py): round trips, interop both ways with Debian's `age` and `gpg`,
damaged, truncated and wrong-key ciphertext, and flat memory on a long stream."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from kkua_backupd.errors import CommandFailed, IntegrityError, StorageError, WrongKey
from kkua_backupd.stream import encrypt
from kkua_backupd.stream.encrypt import (
    AgeEncrypt,
    GpgEncrypt,
    age_decrypt,
    generate_identity,
    gpg_decrypt,
    parse_identities,
    parse_recipient,
    recipient_lines,
)

AGE = shutil.which("age")
needs_age_cli = pytest.mark.skipif(AGE is None, reason="Debian's `age` package is not installed (scripts/setup.sh)")
PASSPHRASE = b"correct horse battery staple"
SSH_KEYGEN = shutil.which("ssh-keygen")


class Collect:
    """The end of a chain: keeps what it is given, remembers close and abort."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.parts: list[bytes] = []
        self.closed = False
        self.aborted = False
        self.fail_after = fail_after

    def write(self, data: bytes, /) -> None:
        if self.fail_after is not None and sum(map(len, self.parts)) >= self.fail_after:
            raise StorageError("disk full while writing test")
        self.parts.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    @property
    def data(self) -> bytes:
        return b"".join(self.parts)


def chunks(data: bytes, size: int = 1 << 20) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


def sample(size: int) -> bytes:
    return (b"COPY public.users (id, name) FROM stdin;\n" + os.urandom(size // 2)) * 2


@pytest.fixture(scope="module")
def key() -> tuple[str, str]:
    return generate_identity()


def age_encrypt(data: bytes, recipients: list[str], piece: int = 1 << 20) -> bytes:
    out = Collect()
    sink = AgeEncrypt(out, recipients)
    for part in chunks(data, piece):
        sink.write(part)
    sink.close()
    assert out.closed and not out.aborted
    return out.data


def gpg_encrypt(data: bytes, passphrase: bytes = PASSPHRASE) -> bytes:
    out = Collect()
    sink = GpgEncrypt(out, passphrase)
    for part in chunks(data):
        sink.write(part)
    sink.close()
    assert out.closed and not out.aborted
    return out.data


@pytest.mark.parametrize("size", [0, 1, 65536, 3 * (1 << 20) + 17])
def test_age_round_trip(key: tuple[str, str], size: int) -> None:
    identity_text, recipient = key
    data = sample(size)[:size]
    cipher = age_encrypt(data, [recipient], piece=100_000)
    assert cipher.startswith(b"age-encryption.org/v1\n")
    assert size < 1000 or data[:4096] not in cipher
    identities = parse_identities(identity_text.encode(), "key")
    assert b"".join(age_decrypt(identities)(chunks(cipher, 7777))) == data


@needs_age_cli
def test_age_interop_both_ways(tmp_path: Path, key: tuple[str, str]) -> None:
    identity_text, recipient = key
    (tmp_path / "key.txt").write_text(identity_text)
    data = sample(2 << 20)
    (tmp_path / "ours.age").write_bytes(age_encrypt(data, [recipient]))
    theirs = subprocess.run([AGE, "--decrypt", "-i", str(tmp_path / "key.txt"), str(tmp_path / "ours.age")],
                            capture_output=True, check=True)
    assert theirs.stdout == data
    made = subprocess.run([AGE, "--encrypt", "-r", recipient], input=data, capture_output=True, check=True)
    identities = parse_identities(identity_text.encode(), "key")
    assert b"".join(age_decrypt(identities)(chunks(made.stdout))) == data


@pytest.mark.skipif(SSH_KEYGEN is None or AGE is None, reason="ssh-keygen or age missing")
def test_age_to_an_ssh_ed25519_key(tmp_path: Path) -> None:
    assert SSH_KEYGEN is not None and AGE is not None
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "id")], check=True)
    public = (tmp_path / "id.pub").read_text().strip()
    data = sample(300_000)
    cipher = age_encrypt(data, [public])
    theirs = subprocess.run([AGE, "--decrypt", "-i", str(tmp_path / "id")], input=cipher, capture_output=True,
                            check=True)
    assert theirs.stdout == data
    identities = parse_identities((tmp_path / "id").read_bytes(), "id")
    assert b"".join(age_decrypt(identities)(chunks(cipher))) == data


def test_age_several_recipients_each_can_read(key: tuple[str, str]) -> None:
    other_text, other_recipient = generate_identity()
    data = sample(100_000)
    cipher = age_encrypt(data, [key[1], other_recipient])
    for text in (key[0], other_text):
        assert b"".join(age_decrypt(parse_identities(text.encode(), "k"))(chunks(cipher))) == data


def test_age_wrong_key_is_a_clear_refusal(key: tuple[str, str]) -> None:
    cipher = age_encrypt(sample(10_000), [key[1]])
    other = parse_identities(generate_identity()[0].encode(), "other")
    with pytest.raises(WrongKey, match="cannot be decrypted with the configured identity") as err:
        b"".join(age_decrypt(other, "pg_x.sql.zst.age")(chunks(cipher)))
    assert err.value.exit_code == 3
    assert "pg_x.sql.zst.age" in str(err.value)


@pytest.mark.parametrize("damage", ["flip-middle", "flip-last", "truncate", "cut-header"])
def test_age_damage_is_an_integrity_error(key: tuple[str, str], damage: str) -> None:
    data = sample(300_000)
    cipher = bytearray(age_encrypt(data, [key[1]]))
    if damage == "flip-middle":
        cipher[len(cipher) // 2] ^= 1
    elif damage == "flip-last":
        cipher[-3] ^= 0x40
    elif damage == "truncate":
        del cipher[-65536 // 2:]
    else:
        del cipher[40:]
    identities = parse_identities(key[0].encode(), "k")
    with pytest.raises(IntegrityError, match="damaged or truncated"):
        b"".join(age_decrypt(identities)(chunks(bytes(cipher))))


def test_age_decrypt_passes_on_the_error_of_its_source(key: tuple[str, str]) -> None:
    cipher = age_encrypt(sample(300_000), [key[1]])

    def source() -> Iterator[bytes]:
        yield cipher[:1000]
        raise StorageError("cannot read x: Input/output error")

    with pytest.raises(StorageError, match="Input/output error"):
        b"".join(age_decrypt(parse_identities(key[0].encode(), "k"))(source()))


def test_age_consumer_that_leaves_early_stops_the_thread(key: tuple[str, str]) -> None:
    cipher = age_encrypt(sample(8 << 20), [key[1]])
    reader = age_decrypt(parse_identities(key[0].encode(), "k"))(chunks(cipher))
    next(reader)
    reader.close()  # GeneratorExit: the decrypting thread must end, not hang on a full queue
    assert not any(t.name == "age-decrypt" and t.is_alive() for t in __import__("threading").enumerate())


def test_age_sink_error_of_the_next_stage_reaches_the_caller_and_abort_cleans(key: tuple[str, str]) -> None:
    out = Collect(fail_after=1 << 20)
    sink = AgeEncrypt(out, [key[1]])
    with pytest.raises(StorageError, match="disk full"):
        for part in chunks(sample(8 << 20)):
            sink.write(part)
        sink.close()
    sink.abort()
    sink.abort()  # twice is fine
    assert out.aborted and not out.closed


@pytest.mark.parametrize("bad", ["", "age1", "age1qqqqqqqqqqqqqqqqqqqqqqqqqqqq", "AGE-SECRET-KEY-1ABC", "ssh-rsa AAAA",
                                 "hello"])
def test_bad_recipients_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="recipient"):
        parse_recipient(bad)


def test_recipient_lines_and_identity_files() -> None:
    text, recipient = generate_identity()
    assert recipient_lines(f"# comment\n\n {recipient} \n") == [recipient]
    assert text.count("AGE-SECRET-KEY-1") == 1 and recipient in text
    with pytest.raises(ValueError, match="line 1 is not an age identity") as err:
        parse_identities(recipient.encode(), "recipients.txt")
    assert recipient not in str(err.value)
    with pytest.raises(ValueError, match="holds no identity"):
        parse_identities(b"# nothing\n", "empty.key")
    with pytest.raises(ValueError, match="not a valid age identity") as err:
        parse_identities(b"AGE-SECRET-KEY-1NOTVALIDSECRET\n", "bad.key")
    assert "NOTVALIDSECRET" not in str(err.value)  # never the key itself


# --- gpg ---------------------------------------------------------------------------------------------------


def gpg_cli(tmp_path: Path, args: list[str], data: bytes, passphrase: bytes = PASSPHRASE) -> bytes:
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700, exist_ok=True)
    pw = tmp_path / "pass"
    pw.write_bytes(passphrase + b"\n")
    result = subprocess.run(["gpg", "--batch", "--quiet", "--homedir", str(home), "--pinentry-mode", "loopback",
                             "--passphrase-file", str(pw), *args], input=data, capture_output=True, check=True)
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], check=False)
    return result.stdout


def test_gpg_round_trip_and_interop_both_ways(tmp_path: Path) -> None:
    data = sample(3 << 20)
    cipher = gpg_encrypt(data)
    assert data[:4096] not in cipher
    assert gpg_cli(tmp_path, ["--decrypt"], cipher) == data
    assert b"".join(gpg_decrypt(PASSPHRASE)(chunks(cipher, 5000))) == data
    theirs = gpg_cli(tmp_path, ["--symmetric", "--cipher-algo", "AES256", "--compress-algo", "none"], data)
    assert b"".join(gpg_decrypt(PASSPHRASE)(chunks(theirs))) == data
    packets = subprocess.run(["gpg", "--batch", "--list-packets", "--homedir", str(tmp_path / "gnupg"),
                              "--passphrase-file", str(tmp_path / "pass"), "--pinentry-mode", "loopback"],
                             input=cipher, capture_output=True, check=False)
    assert "cipher 9" in (packets.stdout + packets.stderr).decode()  # 9 = AES256
    assert "compressed packet" not in packets.stdout.decode()


def test_gpg_empty_stream(tmp_path: Path) -> None:
    cipher = gpg_encrypt(b"")
    assert b"".join(gpg_decrypt(PASSPHRASE)(chunks(cipher))) == b""


def test_gpg_leaves_no_home_folder_or_agent_behind() -> None:
    import tempfile
    before = {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("kkua-gnupg-")}
    cipher = gpg_encrypt(sample(10_000))
    b"".join(gpg_decrypt(PASSPHRASE)(chunks(cipher)))
    after = {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("kkua-gnupg-")}
    assert after == before
    agents = subprocess.run(["pgrep", "-af", "gpg-agent --homedir .*kkua-gnupg-"], capture_output=True, text=True)
    assert not [line for line in agents.stdout.splitlines() if any(p in line for p in after - before)]


def test_gpg_passphrase_is_not_in_argv(tmp_path: Path) -> None:
    argv = encrypt._gpg_argv("/tmp/x", 5, encrypt.GPG_ENCRYPT)
    assert PASSPHRASE.decode() not in " ".join(argv)
    assert "--passphrase-fd" in argv and "--passphrase" not in argv


def test_gpg_wrong_passphrase_is_a_clear_refusal() -> None:
    cipher = gpg_encrypt(sample(10_000))
    with pytest.raises(WrongKey, match="configured passphrase") as err:
        b"".join(gpg_decrypt(b"not it", "redis_x.rdb.gz.gpg")(chunks(cipher)))
    assert err.value.exit_code == 3


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_gpg_damage_is_an_integrity_error(damage: str) -> None:
    cipher = bytearray(gpg_encrypt(sample(300_000)))
    if damage == "flip":
        cipher[len(cipher) // 2] ^= 1
    else:
        del cipher[len(cipher) // 2:]
    with pytest.raises(IntegrityError, match="damaged or truncated"):
        b"".join(gpg_decrypt(PASSPHRASE)(chunks(bytes(cipher))))


def test_gpg_sink_abort_stops_gpg_and_aborts_the_next_stage() -> None:
    out = Collect()
    sink = GpgEncrypt(out, PASSPHRASE)
    sink.write(sample(100_000))
    sink.abort()
    assert out.aborted and not out.closed


def test_gpg_refuses_a_passphrase_of_several_lines() -> None:
    with pytest.raises(ValueError, match="one non-empty line"):
        GpgEncrypt(Collect(), b"two\nlines")


def test_missing_gpg_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encrypt, "GPG", "/nonexistent/gpg")
    with pytest.raises(CommandFailed, match="not found"):
        GpgEncrypt(Collect(), PASSPHRASE)


@pytest.mark.parametrize("method", ["age", "gpg"])
def test_memory_stays_flat_on_a_long_stream(tmp_path: Path, method: str) -> None:
    """256 MiB through encryption and back in a fresh process: its peak memory grows by far less."""
    script = textwrap.dedent(f"""
        import resource, os
        from kkua_backupd.stream.encrypt import AgeEncrypt, GpgEncrypt, age_decrypt, gpg_decrypt, generate_identity
        from kkua_backupd.stream.encrypt import parse_identities
        class Count:
            n = 0
            parts = []
            def write(self, d): self.n += len(d); self.parts.append(d) if len(self.parts) < 0 else None
            def close(self): pass
            def abort(self): pass
        text, rec = generate_identity()
        block = os.urandom(1 << 20)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = Count()
        sink = AgeEncrypt(out, [rec]) if {method!r} == "age" else GpgEncrypt(out, b"pw")
        for _ in range(256):
            sink.write(block)
        sink.close()
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print("RESULT", out.n, grown)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT"))
    size, grown_kib = map(int, line.split()[1:])
    assert size > 256 << 20
    assert grown_kib < 40 * 1024, f"peak memory grew by {grown_kib} KiB for 256 MiB"
