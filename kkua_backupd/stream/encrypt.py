"""Encryption, a stage of the byte chain (stream/stages.py): after compression, before hashing and the file.

Two methods. age (through pyrage) to public-key recipients, `age1…` x25519 keys or `ssh-ed25519` keys, so a
database host can write backups it cannot read; the identity (secret key) is needed only where restores happen.
gpg (Debian's `gpg` binary), `--symmetric --cipher-algo AES256 --compress-algo none` with a passphrase read from
a file and handed over a pipe (`--passphrase-fd`), never argv, for operators who must decrypt by hand with gpg.

Both stream: pyrage's `encrypt_io`/`decrypt_io` pull from a file-like object, so each runs on a thread fed by a
small bounded queue (a few chunks in flight, memory flat whatever the size); gpg is a child process fed and read
through pipes. Every write into the next stage happens on the caller's thread, so an error there (disk full)
surfaces where the caller writes. Neither format authenticates before the end: age refuses a damaged chunk when
it reaches it, gpg its modification code at the very end, so the plaintext before that point has already been
handed on. Restores therefore check the stored sha256 first and never pipe unchecked plaintext anywhere.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import shutil
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pyrage
from pyrage import ssh, x25519

from kkua_backupd.errors import CommandFailed, IntegrityError, KeyMissing, KkuaError, WrongKey
from kkua_backupd.proc.execute import PIPE, ProcessGroup, run
from kkua_backupd.stream.stages import Reader, Sink

Method = Literal["age", "gpg"]
METHODS: tuple[Method, ...] = ("age", "gpg")
EXTENSIONS: dict[str, str] = {"age": ".age", "gpg": ".gpg"}
GPG = "gpg"
_DEPTH = 4  # chunks queued between the caller and the encrypting thread
_SSH_KEY_TYPES = ("ssh-ed25519", "ssh-rsa")
_AGE_IDENTITY_PREFIX = "AGE-SECRET-KEY-1"
_OPENSSH_PRIVATE = "-----BEGIN OPENSSH PRIVATE KEY-----"

AgeRecipient = x25519.Recipient | ssh.Recipient
AgeIdentity = x25519.Identity | ssh.Identity


# --- keys -------------------------------------------------------------------------------------------------


def parse_recipient(text: str) -> AgeRecipient:
    """An age recipient from its text (`age1…`, or an `ssh-ed25519 AAAA… [comment]` public key line);
    raises ValueError saying what is wrong."""
    text = text.strip()
    try:
        if text.startswith("age1"):
            return x25519.Recipient.from_str(text)
        if text.startswith(_SSH_KEY_TYPES):
            return ssh.Recipient.from_str(text)
    except pyrage.RecipientError as exc:
        raise ValueError(f"{_shorten(text)} is not a valid age recipient ({exc})") from None
    raise ValueError(f"{_shorten(text)} is not an age recipient: expected age1… (an x25519 key from "
                     "`kkua-backup key generate` or age-keygen) or an ssh-ed25519 public key")


def recipient_lines(text: str) -> list[str]:
    """The recipients of a recipients file: one a line, blank lines and `#` comments skipped (age's format)."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def parse_identities(data: bytes, name: str) -> list[AgeIdentity]:
    """The identities of an identity file: `AGE-SECRET-KEY-1…` lines (age-keygen's format, comments
    allowed) or an unencrypted OpenSSH private key; raises ValueError naming `name` (never the key)."""
    text = data.decode("utf-8", "replace")
    if _OPENSSH_PRIVATE in text:
        try:
            return [ssh.Identity.from_buffer(data)]
        except Exception as exc:  # pyrage raises its own IdentityError or a ValueError
            raise ValueError(f"{name} is not a usable OpenSSH private key ({type(exc).__name__}); it must be "
                             "an unencrypted ssh-ed25519 key") from None
    identities: list[AgeIdentity] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith(_AGE_IDENTITY_PREFIX):
            raise ValueError(f"{name} line {number} is not an age identity (AGE-SECRET-KEY-1…)")
        try:
            identities.append(x25519.Identity.from_str(line))
        except pyrage.IdentityError:
            raise ValueError(f"{name} line {number} is not a valid age identity") from None
    if not identities:
        raise ValueError(f"{name} holds no identity (expected AGE-SECRET-KEY-1… lines or an OpenSSH private key)")
    return identities


def identity_recipient(identity: AgeIdentity) -> str | None:
    """The public recipient of an x25519 identity (None for an ssh key, whose public half it does not hold
    in a form we compare)."""
    return str(identity.to_public()) if isinstance(identity, x25519.Identity) else None


def generate_identity() -> tuple[str, str]:
    """A new x25519 identity: the identity file's text (age-keygen's format) and its public recipient."""
    identity = x25519.Identity.generate()
    recipient = str(identity.to_public())
    text = f"# created by kkua-backup key generate\n# public key: {recipient}\n{identity}\n"
    return text, recipient


def _shorten(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


# --- age ----------------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised into pyrage by our file-like objects when the caller gave up (abort, a consumer that left)."""


class _ChunkInput(io.RawIOBase):
    """What pyrage reads from: the chunks `take` returns (None at the end), in the sizes pyrage asks for. An
    error of `take` is kept in `error` for the caller (pyrage would turn it into one of its own)."""

    def __init__(self, take: Callable[[], bytes | None], stop: threading.Event) -> None:
        super().__init__()
        self._take = take
        self._stop = stop
        self._current = memoryview(b"")
        self._ended = False
        self.error: BaseException | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._current and not self._ended:
            if self._stop.is_set():
                raise _Stop
            try:
                chunk = self._take()
            except BaseException as exc:
                self.error = exc
                raise
            if self._stop.is_set():
                raise _Stop
            if chunk is None:
                self._ended = True
            else:
                self._current = memoryview(chunk)
        size = min(len(buffer), len(self._current))
        buffer[:size] = self._current[:size]
        self._current = self._current[size:]
        return size


class _ListOutput(io.RawIOBase):
    """What pyrage writes to: a list the caller's thread empties into the next stage."""

    def __init__(self, stop: threading.Event) -> None:
        super().__init__()
        self.parts: deque[bytes] = deque()
        self._stop = stop

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self._stop.is_set():
            raise _Stop
        self.parts.append(bytes(data))
        return len(data)


class AgeEncrypt:
    """A Sink encrypting to age recipients into `inner`."""

    def __init__(self, inner: Sink, recipients: Sequence[str]) -> None:
        self._inner = inner
        parsed = [parse_recipient(r) for r in recipients]
        if not parsed:
            raise ValueError("age encryption needs at least one recipient")
        self._stop = threading.Event()
        self._input: queue.Queue[bytes | None] = queue.Queue(maxsize=_DEPTH)
        self._output = _ListOutput(self._stop)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._encrypt, args=(parsed,), name="age-encrypt", daemon=True)
        self._thread.start()

    def _encrypt(self, recipients: list[AgeRecipient]) -> None:
        try:
            pyrage.encrypt_io(_ChunkInput(self._input.get, self._stop), self._output,  # type: ignore[arg-type]
                              recipients)
        except BaseException as exc:  # handed to the caller's thread
            self._error = exc

    def _drain(self) -> None:
        while self._output.parts:
            self._inner.write(self._output.parts.popleft())

    def _put(self, item: bytes | None) -> None:
        while True:
            try:
                self._input.put(item, timeout=0.5)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    self._raise()
                self._drain()

    def _raise(self) -> None:
        error = self._error
        if isinstance(error, KkuaError):
            raise error
        raise IntegrityError(f"age encryption failed: {error}") from None

    def write(self, data: bytes, /) -> None:
        """Encrypt the next bytes; raises what the next stage raises, or IntegrityError if age fails."""
        if data:
            self._put(bytes(data))
        self._drain()

    def close(self) -> None:
        """Write the last encrypted chunk into the next stage, then close it."""
        self._put(None)
        self._thread.join()
        if self._error is not None:
            self._raise()
        self._drain()
        self._inner.close()

    def abort(self) -> None:
        """Drop everything and abort the next stage."""
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self._input.put_nowait(None)  # wakes a thread waiting for input; it then sees the stop
        self._thread.join()
        self._output.parts.clear()
        self._inner.abort()


class _QueueOutput(io.RawIOBase):
    """What pyrage writes plaintext to: a bounded queue the consumer reads from."""

    def __init__(self, out: queue.Queue[bytes | None], stop: threading.Event) -> None:
        super().__init__()
        self._out = out
        self._stop = stop

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        item = bytes(data)
        while True:
            if self._stop.is_set():
                raise _Stop
            try:
                self._out.put(item, timeout=0.5)
                return len(item)
            except queue.Full:
                continue


def age_decrypt(identities: Sequence[AgeIdentity], name: str = "backup") -> Reader:
    """A Reader decrypting age ciphertext with `identities`; raises WrongKey when none of them opens the file,
    IntegrityError when it is damaged or truncated (at the damaged chunk, after the plaintext before it)."""
    keys = list(identities)

    def read(chunks: Iterable[bytes]) -> Iterator[bytes]:
        stop = threading.Event()
        out: queue.Queue[bytes | None] = queue.Queue(maxsize=_DEPTH)
        pending = iter(chunks)
        source = _ChunkInput(lambda: next(pending, None), stop)
        failure: list[BaseException] = []

        def work() -> None:
            try:
                pyrage.decrypt_io(source, _QueueOutput(out, stop), keys)  # type: ignore[arg-type]
            except BaseException as exc:
                failure.append(exc)
            while not stop.is_set():
                with contextlib.suppress(queue.Full):
                    out.put(None, timeout=0.5)
                    return

        thread = threading.Thread(target=work, name="age-decrypt", daemon=True)
        thread.start()
        try:
            while (item := out.get()) is not None:
                yield item
        finally:
            stop.set()
            with contextlib.suppress(queue.Empty):
                out.get_nowait()  # a writer waiting for room sees the stop
            thread.join()
        if source.error is not None:
            raise source.error
        if failure:
            raise _age_error(failure[0], name)

    return read


def _age_error(exc: BaseException, name: str) -> KkuaError:
    if isinstance(exc, KkuaError):
        return exc
    text = str(exc)
    if "No matching keys" in text:
        return WrongKey(f"{name} cannot be decrypted with the configured identity: it was encrypted to other "
                        "recipients", hint="set [encryption] identity_file to the key whose recipient this set "
                                           "lists (`kkua-backup list` shows it)")
    return IntegrityError(f"{name} is damaged or truncated: age refused it ({text})",
                          hint="use another backup; this one cannot be restored")


# --- gpg ----------------------------------------------------------------------------------------------------


def _gpg_argv(homedir: str, fd: int, action: tuple[str, ...]) -> tuple[str, ...]:
    """gpg's command line: batch mode, a throwaway home, the passphrase on descriptor `fd`."""
    return (GPG, "--batch", "--quiet", "--no-tty", "--no-permission-warning", "--homedir", homedir,
            "--pinentry-mode", "loopback", "--passphrase-fd", str(fd), *action)


# An explicit S2K count (the largest gpg offers; its derivation costs a fraction of a second): without it
# gpg-agent calibrates one on every start, which costs seconds per file.
GPG_ENCRYPT = ("--symmetric", "--cipher-algo", "AES256", "--compress-algo", "none", "--s2k-digest-algo", "SHA256",
               "--s2k-count", "65011712", "--output", "-")
GPG_DECRYPT = ("--no-symkey-cache", "--decrypt", "--output", "-")


class _Gpg:
    """One gpg child with a throwaway home folder (removed, with the gpg-agent gpg starts in it, at the
    end) and the passphrase on a pipe of its own; its stdout is read on a thread into `parts`."""

    def __init__(self, passphrase: bytes, action: tuple[str, ...], job: str) -> None:
        if b"\n" in passphrase or not passphrase:
            raise ValueError("a gpg passphrase is one non-empty line")
        self.home = tempfile.mkdtemp(prefix="kkua-gnupg-")
        read_end, write_end = os.pipe()
        try:
            try:
                os.write(write_end, passphrase + b"\n")  # far below a pipe's capacity: never blocks
            finally:
                os.close(write_end)
            self.group = ProcessGroup(job, grace=5)
            self.child = self.group.spawn(_gpg_argv(self.home, read_end, action), name="gpg", stdin=PIPE,
                                          stdout=PIPE, pass_fds=(read_end,))
        except BaseException:
            self._remove_home()
            raise
        finally:
            os.close(read_end)
        self.parts: queue.Queue[bytes | None] = queue.Queue(maxsize=_DEPTH)
        self.reader = threading.Thread(target=self._read, name="gpg-out", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while data := self.child.read(1 << 20):
            self.parts.put(data)
        self.parts.put(None)

    def finish(self) -> None:
        """Wait for gpg; raises CommandFailed with its last stderr lines unless it exited 0."""
        try:
            self.group.wait(self.child, what="gpg")
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        """Stop gpg if it still runs, stop the agent it started, remove the home folder."""
        if self.child.popen.poll() is None:
            self.group.stop_all()
        self.group.__exit__(None, None, None)
        if os.path.exists(os.path.join(self.home, "S.gpg-agent")):
            with contextlib.suppress(KkuaError):
                run(("gpgconf", "--homedir", self.home, "--kill", "gpg-agent"), job=self.group.job, timeout=10)
        self._remove_home()

    def _remove_home(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)


class GpgEncrypt:
    """A Sink encrypting with `gpg --symmetric --cipher-algo AES256 --compress-algo none` into `inner`."""

    def __init__(self, inner: Sink, passphrase: bytes, *, job: str = "gpg") -> None:
        self._inner = inner
        self._gpg = _Gpg(passphrase, GPG_ENCRYPT, job)
        self._held: deque[bytes] = deque()
        self._drainer = threading.Thread(target=self._collect, name="gpg-collect", daemon=True)
        self._lock = threading.Lock()
        self._drainer.start()

    def _collect(self) -> None:
        while (part := self._gpg.parts.get()) is not None:
            with self._lock:
                self._held.append(part)

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._held:
                    return
                part = self._held.popleft()
            self._inner.write(part)

    def write(self, data: bytes, /) -> None:
        """Encrypt the next bytes; raises CommandFailed when gpg stopped, or what the next stage raises."""
        stdin = self._gpg.child.stdin
        assert stdin is not None
        try:
            stdin.write(data)
        except (BrokenPipeError, ValueError):
            self._gpg.finish()  # raises gpg's own reason
            raise CommandFailed("gpg stopped taking data") from None
        self._drain()

    def close(self) -> None:
        """Finish gpg's stream, write the rest into the next stage, then close it."""
        stdin = self._gpg.child.stdin
        assert stdin is not None
        with contextlib.suppress(BrokenPipeError):
            stdin.close()
        self._drainer.join()
        self._gpg.reader.join()
        self._gpg.finish()
        self._drain()
        self._inner.close()

    def abort(self) -> None:
        """Stop gpg, drop what it wrote, abort the next stage."""
        self._gpg.group.stop_all()
        with contextlib.suppress(OSError, ValueError):
            if self._gpg.child.stdin is not None:
                self._gpg.child.stdin.close()
        while self._drainer.is_alive():
            with contextlib.suppress(queue.Empty):
                if self._gpg.parts.get(timeout=0.1) is None:
                    self._gpg.parts.put(None)  # the end mark is the drainer's: taken here, it would wait forever
                    self._drainer.join()
            self._drainer.join(timeout=0.1)
        self._gpg.cleanup()
        self._held.clear()
        self._inner.abort()


def gpg_decrypt(passphrase: bytes, name: str = "backup", *, job: str = "gpg") -> Reader:
    """A Reader decrypting gpg's symmetric format; raises WrongKey for a wrong passphrase, IntegrityError for a
    damaged or truncated file (gpg checks its modification code at the end, after the plaintext)."""

    def read(chunks: Iterable[bytes]) -> Iterator[bytes]:
        gpg = _Gpg(passphrase, GPG_DECRYPT, job)
        feed_error: list[BaseException] = []

        def feed() -> None:
            stdin = gpg.child.stdin
            assert stdin is not None
            try:
                for chunk in chunks:
                    stdin.write(chunk)
            except (BrokenPipeError, ValueError):
                pass
            except BaseException as exc:
                feed_error.append(exc)
                gpg.group.stop_all()
            finally:
                with contextlib.suppress(BrokenPipeError, ValueError):
                    stdin.close()

        feeder = threading.Thread(target=feed, name="gpg-feed", daemon=True)
        feeder.start()
        finished = False
        try:
            while (part := gpg.parts.get()) is not None:
                yield part
            finished = True
        finally:
            if not finished:
                gpg.group.stop_all()
                while gpg.reader.is_alive():
                    with contextlib.suppress(queue.Empty):
                        gpg.parts.get(timeout=0.1)
            feeder.join()
            if not finished:
                gpg.cleanup()
        if feed_error:
            gpg.cleanup()
            raise feed_error[0]
        try:
            gpg.finish()
        except CommandFailed as exc:
            raise _gpg_error(exc, name) from None

    return read


def _gpg_error(exc: CommandFailed, name: str) -> KkuaError:
    tail = " ".join(exc.stderr_tail)
    if "Bad session key" in tail:
        return WrongKey(f"{name} cannot be decrypted with the configured passphrase (gpg: bad session key)",
                        hint="set [encryption] passphrase_file to the passphrase this set was encrypted with")
    return IntegrityError(f"{name} is damaged or truncated: gpg refused it ({' | '.join(exc.stderr_tail[-2:])})",
                          hint="use another backup; this one cannot be restored")


# --- choosing ---------------------------------------------------------------------------------------------------


def encrypting(method: str, inner: Sink, *, recipients: Sequence[str] = (), passphrase: bytes | None = None,
               job: str = "gpg") -> Sink:
    """The encrypting Sink for `method` in front of `inner`."""
    if method == "age":
        return AgeEncrypt(inner, recipients)
    if method == "gpg":
        if passphrase is None:
            raise ValueError("gpg encryption needs a passphrase")
        return GpgEncrypt(inner, passphrase, job=job)
    raise ValueError(f"unknown encryption method {method!r}")


# --- what a host encrypts with and decrypts with (core/context.context_for puts it in the chain) -------------


@dataclass(frozen=True)
class Keys:
    """What this host encrypts new files with (`method` None: it does not) and how it opens encrypted ones.
    Built from the config's [encryption] section (config.Config.keys); the identities are read only when a
    file is opened, so a host that only makes backups never needs them."""

    method: Method | None = None
    recipients: tuple[str, ...] = ()
    passphrase: bytes | None = None
    identities: Callable[[], list[AgeIdentity]] | None = None
    signing_key: bytes | None = None
    job: str = "gpg"

    @property
    def extension(self) -> str:
        """What new file names gain: `.age`, `.gpg`, or nothing."""
        return EXTENSIONS[self.method] if self.method else ""

    def record(self) -> dict[str, Any] | None:
        """What a manifest records of the encryption of its set (so `list` shows what it needs)."""
        if self.method is None:
            return None
        if self.method == "age":
            return {"method": "age", "recipients": list(self.recipients)}
        return {"method": "gpg", "cipher": "AES256"}

    def sink(self, inner: Sink) -> Sink:
        """The encrypting stage in front of `inner`."""
        assert self.method is not None
        return encrypting(self.method, inner, recipients=self.recipients, passphrase=self.passphrase, job=self.job)

    def reader(self, method: str, name: str) -> Reader:
        """The Reader that decrypts a file encrypted with `method`; raises KeyMissing when this host lacks the
        key for it."""
        if method == "age":
            if self.identities is None:
                raise KeyMissing(f"{name} is encrypted with age and no identity is configured to decrypt it",
                                 hint="set [encryption] identity_file to the age key of a recipient the set "
                                      "lists (`kkua-backup list`)")
            return age_decrypt(self.identities(), name)
        if method == "gpg":
            if self.passphrase is None:
                raise KeyMissing(f"{name} is encrypted with gpg and no passphrase_file is configured",
                                 hint='set [encryption] method = "gpg" and passphrase_file to the passphrase it '
                                      "was made with")
            return gpg_decrypt(self.passphrase, name, job=self.job)
        raise IntegrityError(f"{name} is encrypted with {method!r}, which this version does not know",
                             hint="use a newer kkua-backup")


def encryption_of(name: str) -> Method | None:
    """How a stored file is encrypted, from its name (`.age`, `.gpg`; the manifest records the same)."""
    for method in METHODS:
        if name.endswith(EXTENSIONS[method]):
            return method
    return None


def without_encryption_suffix(name: str) -> str:
    """`name` without its `.age`/`.gpg` (what it would be called unencrypted)."""
    method = encryption_of(name)
    return name.removesuffix(EXTENSIONS[method]) if method else name
