"""A task process's latest progress in shared memory, read by its serving process without a message.

A message per progress value wakes the controlling thread of the task in the serving process: with many
busy tasks, most of what the web tier spent on them. Instead, a task process (on Linux) writes its latest
``upload_status`` value into a buffer of its own, an anonymous shared-memory file (``memfd``), and the
serving process's progress flusher reads the buffers of its running tasks once per flush interval: one
wake-up of one thread for all of them, none for the controlling threads.

The serving process learns of a buffer from a :class:`~.protocol.Progress` message that names its
descriptor (``buffer_fd``): the task's first value is sent as a message, then one every
:data:`MESSAGE_EVERY` seconds and its last before the task's end, so that a serving process that adopted
the task (see :mod:`.handover`), or one that cannot open the buffer, still sees progress, later. It opens
the buffer through ``/proc/<pid>/fd/<fd>`` (the same user's process).

A record is written whole at offset 0 with one ``pwrite``: a header (magic, sequence number, length, CRC-32)
with the task's uuid, then the value's JSON text. A reader that catches a write half done sees the CRC
differ and reads again at its next turn; a record of an earlier task of a reused process is told apart
by its uuid.
"""
from __future__ import annotations

import functools
import json
import os
import struct
import zlib
from typing import Any, Optional

__all__ = ["MESSAGE_EVERY", "ProgressBuffer", "BufferReader", "open_reader", "supported"]

#: Seconds between two progress messages of a task that writes its progress to a buffer.
MESSAGE_EVERY = 5.0

_NAME = "mpc-progress"
_MAGIC = b"MPCp"
#: magic, sequence number, length of the JSON text, CRC-32 of the sequence number, uuid and text; uuid.
_HEADER = struct.Struct("<4sQII36s")
#: Bytes read at once: a record this long (most are) takes one read.
_FIRST_READ = 4096


@functools.lru_cache(maxsize=None)
def supported() -> bool:
    """Whether task processes can have progress buffers here (Linux's memfd and /proc): looked at once per process,
    not at each task."""
    return hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


def _crc(seq: int, uuid: bytes, text: bytes) -> int:
    return zlib.crc32(text, zlib.crc32(uuid, zlib.crc32(seq.to_bytes(8, "little"))))


class ProgressBuffer:
    """The task process's side: the buffer it writes its latest progress to (one per process)."""

    def __init__(self) -> None:
        # Close-on-exec: a program the task runs has no business with it.
        self.fd = os.memfd_create(_NAME, os.MFD_CLOEXEC)
        self._seq = 0

    def write(self, uuid: str, text: str) -> None:
        """Make ``text`` (JSON) task ``uuid``'s latest progress in the buffer."""
        self._seq += 1
        data = text.encode("utf-8")
        tag = uuid.encode("ascii", "replace")[:36].ljust(36)
        header = _HEADER.pack(_MAGIC, self._seq, len(data), _crc(self._seq, tag, data), tag)
        os.pwrite(self.fd, header + data, 0)

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


class BufferReader:
    """The serving process's side: reads one task process's buffer, telling new records from seen ones."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._seq = 0

    def read(self, uuid: str) -> tuple[bool, Any]:
        """(True, value) when the buffer holds a record of task ``uuid`` newer than the last one read; else
        (False, None): nothing new, an earlier task's record, or a write caught half done."""
        try:
            data = os.pread(self.fd, _FIRST_READ, 0)
            if len(data) < _HEADER.size:
                return False, None
            magic, seq, length, crc, tag = _HEADER.unpack_from(data)
            if magic != _MAGIC or seq == self._seq:
                return False, None
            end = _HEADER.size + length
            if len(data) < end:
                data = os.pread(self.fd, end, 0)
            text = data[_HEADER.size:end]
            if len(text) != length or _crc(seq, tag, text) != crc:
                return False, None
        except OSError:
            return False, None
        self._seq = seq
        if tag.rstrip(b" ").decode("ascii", "replace") != uuid:
            return False, None
        return True, json.loads(text)

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def open_reader(pid: int, fd: int) -> Optional[BufferReader]:
    """A reader of the buffer that process ``pid`` holds as descriptor ``fd``; None when it cannot be opened
    (the process ended, or another user's)."""
    path = f"/proc/{pid}/fd/{fd}"
    try:
        if not os.readlink(path).startswith(f"/memfd:{_NAME}"):
            return None
        return BufferReader(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    except OSError:
        return None
