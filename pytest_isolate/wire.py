"""Length-prefixed JSON messages on raw file descriptors.

The child that runs a test is untrusted (it may be root in its sandbox), and the fork
server that reads its messages sits outside the sandbox: JSON, never pickle, so a
hostile test cannot make the host side execute anything by writing to its pipe.

A test can also write anything at all onto that pipe (it finds the fd in
/proc/self/fd). The server's :class:`Reader` therefore never raises on what it reads:
it counts the bytes that are not a frame, finds the next frame after them, and says
afterwards what the test did (:meth:`Reader.fault`), so the test fails with that one
line and the server, its worker and the run go on.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from typing import Any

_HDR = struct.Struct("!I")
#: Taken at import, before any test runs: a sandbox sends its reports while the test's
#: monkeypatches are still in place (the call report precedes their undoing), and a
#: test that replaced ``os.write`` or ``json.dumps`` must neither see nor break that.
_write = os.write
_read = os.read
_fstat = os.fstat
_encode = json.JSONEncoder(separators=(",", ":"), default=repr).encode
_decode = json.JSONDecoder().decode
#: A single message from a sandbox larger than this is refused (a test cannot make the
#: host allocate unbounded memory by lying about a length); the child trims what it
#: sends to fit (``child.py``).
MAX_MESSAGE = 64 << 20
#: The bound for messages between the plugin's own processes (fork server to
#: controller): a sanity check, not a defence. One answer carries every report of a
#: test, and pytest's reports repeat the captured output phase after phase: 20 MB of
#: stdout and stderr make an 80 MB answer that pytest in-process would show too.
MAX_TRUSTED = 1 << 30
#: Every frame the plugin sends is a JSON object with a "t" key, so its body starts so:
#: after garbage, the next frame is found by this mark, 4 bytes after its header.
_MARK = b'{"t":"'


class ChannelLost(OSError):
    """The sandbox's result channel is no longer the pipe it was (see :func:`guard`)."""


#: ``(fd, st_dev, st_ino)`` of the result channel in a sandbox: set by :func:`guard`.
_guarded: tuple[int, int, int] | None = None


def guard(fd: int) -> None:
    """In a sandbox, before its test runs: remember which pipe ``fd`` is.

    A test may close the fd (a daemonizing helper's ``closerange``) and open something
    that gets its number; the reports would then be written into the test's own file.
    :func:`send` on ``fd`` checks it first and raises :class:`ChannelLost` instead."""
    global _guarded
    st = _fstat(fd)
    _guarded = (fd, st.st_dev, st.st_ino)


def channel_lost(fd: int) -> str | None:
    """What happened to the guarded channel ``fd``, in the words of a failure; None
    while it is intact (or not guarded)."""
    if _guarded is None or _guarded[0] != fd:
        return None
    try:
        st = _fstat(fd)
    except OSError:
        return f"the test closed its result channel (fd {fd})"
    if (st.st_dev, st.st_ino) != _guarded[1:]:
        return f"the test closed its result channel (fd {fd}) and reused the number for another file"
    return None


def encode(obj: Any) -> bytes:
    body = _encode(obj).encode()
    return _HDR.pack(len(body)) + body


def send(fd: int, obj: Any) -> None:
    """Write one message; loops over partial writes (pipes may take less than all)."""
    write_frame(fd, encode(obj))


def write_frame(fd: int, frame: bytes) -> None:
    """Write one encoded message (for a sender that needed its size first)."""
    data = memoryview(frame)
    if _guarded is not None and fd == _guarded[0]:
        lost = channel_lost(fd)
        if lost is not None:
            raise ChannelLost(lost)
    while data:
        try:
            n = _write(fd, data)
        except OSError as exc:
            lost = channel_lost(fd)
            if lost is not None:
                raise ChannelLost(lost) from exc
            raise
        data = data[n:]


class Reader:
    """Incremental decoder: feed() bytes as they arrive, iterate complete messages.

    ``limit``: the largest frame accepted. ``check``: whether a decoded frame is one the
    reader's owner can use (a JSON object of the right shape); one it cannot counts as
    bytes that are not a frame. Only where the peer is trusted (the plugin's own
    processes) does a bad frame raise ``ValueError``: ``strict``.
    """

    def __init__(
        self, limit: int = MAX_TRUSTED, check: Callable[[Any], bool] | None = None, strict: bool = True
    ) -> None:
        self._buf = bytearray()
        self.limit = limit
        self.check = check
        self.strict = strict
        #: Bytes skipped as not being a frame, so far.
        self.garbage = 0
        #: The first bad frame header that announced more than ``limit`` (with a JSON
        #: object after it: a frame too large, rather than garbage).
        self.oversized = 0
        self._lost = False  # after garbage: looking for the next frame

    def feed(self, data: bytes) -> list[Any]:
        self._buf += data
        out: list[Any] = []
        while len(self._buf) >= _HDR.size:
            if self._lost and not self._resync():
                break
            (n,) = _HDR.unpack_from(self._buf)
            if n > self.limit:
                if len(self._buf) == _HDR.size:
                    break  # is an object coming (a frame too large) or garbage?
                if self.strict:
                    raise ValueError(f"message of {n} bytes exceeds the {self.limit} byte limit")
                if self._buf[_HDR.size] == _MARK[0] and not self.oversized and not self.garbage:
                    self.oversized = n
                self._skip(1)
                continue
            if len(self._buf) < _HDR.size + n:
                break
            body = bytes(self._buf[_HDR.size : _HDR.size + n])
            try:
                msg = _decode(body.decode())
            except ValueError:  # not UTF-8, not JSON
                if self.strict:
                    raise
                self._skip(1)
                continue
            if self.check is not None and not self.check(msg):
                if self.strict:
                    raise ValueError(f"unexpected message {body[:80]!r}")
                self._skip(1)
                continue
            del self._buf[: _HDR.size + n]
            out.append(msg)
        return out

    def _skip(self, n: int) -> None:
        """Count ``n`` bytes as garbage and look for the next frame after them."""
        del self._buf[:n]
        self.garbage += n
        self._lost = True

    def _resync(self) -> bool:
        """Drop bytes up to the next place a frame could start; False: none yet."""
        at = self._buf.find(_MARK, _HDR.size)
        if at < 0:
            # Keep what may be the start of a header and mark split by this read.
            keep = _HDR.size + len(_MARK) - 1
            if len(self._buf) > keep:
                self.garbage += len(self._buf) - keep
                del self._buf[: len(self._buf) - keep]
            return False
        self.garbage += at - _HDR.size
        del self._buf[: at - _HDR.size]
        self._lost = False
        return True

    def close(self) -> list[Any]:
        """Nothing more will come: frames still found in what is left after a bogus
        header (which waited for bytes that never came); the rest is garbage."""
        out: list[Any] = []
        while self._buf:
            if len(self._buf) < _HDR.size:
                self._skip(len(self._buf))
                break
            self._skip(1)
            out += self.feed(b"")
        return out

    def fault(self, fd: int | None) -> str | None:
        """What the writer did to the channel, as one line of a failure; None if nothing.

        ``fd``: the channel's number in the writer, when it said so."""
        garbage = self.garbage + len(self._buf)
        where = "its result channel" + (f" (fd {fd})" if fd is not None else "")
        if self.oversized:
            return (
                f"the test wrote a frame of {self.oversized} bytes onto {where}, "
                f"over the {self.limit} byte limit"
            )
        if garbage:
            unit = "byte that is" if garbage == 1 else "bytes that are"
            return f"the test wrote {garbage} {unit} not a result frame onto {where}"
        return None


def recv(fd: int, limit: int = MAX_TRUSTED) -> Any:
    """Blocking read of exactly one message; EOFError when the writer is gone."""
    hdr = _read_exact(fd, _HDR.size)
    (n,) = _HDR.unpack(hdr)
    if n > limit:
        raise ValueError(f"message of {n} bytes exceeds the {limit} byte limit")
    return _decode(_read_exact(fd, n).decode())


def _read_exact(fd: int, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = _read(fd, n - len(buf))
        if not chunk:
            raise EOFError("peer closed the pipe")
        buf += chunk
    return bytes(buf)
