"""Length-prefixed JSON messages on raw file descriptors.

The child that runs a test is untrusted (it may be root in its sandbox), and the fork
server that reads its messages sits outside the sandbox: JSON, never pickle, so a
hostile test cannot make the host side execute anything by writing to its pipe.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

_HDR = struct.Struct("!I")
#: Taken at import, before any test runs: a sandbox sends its reports while the test's
#: monkeypatches are still in place (the call report precedes their undoing), and a
#: test that replaced ``os.write`` or ``json.dumps`` must neither see nor break that.
_write = os.write
_read = os.read
_encode = json.JSONEncoder(separators=(",", ":"), default=repr).encode
_decode = json.JSONDecoder().decode
#: A single message larger than this is refused (a test cannot make the host allocate
#: unbounded memory by lying about a length).
MAX_MESSAGE = 64 << 20


def encode(obj: Any) -> bytes:
    body = _encode(obj).encode()
    return _HDR.pack(len(body)) + body


def send(fd: int, obj: Any) -> None:
    """Write one message; loops over partial writes (pipes may take less than all)."""
    data = memoryview(encode(obj))
    while data:
        n = _write(fd, data)
        data = data[n:]


class Reader:
    """Incremental decoder: feed() bytes as they arrive, iterate complete messages."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self._buf += data
        out: list[Any] = []
        while len(self._buf) >= _HDR.size:
            (n,) = _HDR.unpack_from(self._buf)
            if n > MAX_MESSAGE:
                raise ValueError(f"message of {n} bytes exceeds the {MAX_MESSAGE} byte limit")
            if len(self._buf) < _HDR.size + n:
                break
            body = bytes(self._buf[_HDR.size : _HDR.size + n])
            del self._buf[: _HDR.size + n]
            out.append(_decode(body.decode()))
        return out


def recv(fd: int) -> Any:
    """Blocking read of exactly one message; EOFError when the writer is gone."""
    hdr = _read_exact(fd, _HDR.size)
    (n,) = _HDR.unpack(hdr)
    if n > MAX_MESSAGE:
        raise ValueError(f"message of {n} bytes exceeds the {MAX_MESSAGE} byte limit")
    return _decode(_read_exact(fd, n).decode())


def _read_exact(fd: int, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = _read(fd, n - len(buf))
        if not chunk:
            raise EOFError("peer closed the pipe")
        buf += chunk
    return bytes(buf)
