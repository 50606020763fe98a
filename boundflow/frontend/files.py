"""Reading model and property files, plain or gzip-compressed.

VNN-COMP ships its instances as ``.onnx.gz`` and ``.vnnlib.gz``. :func:`read_bytes` tells gzip
data by its magic bytes (a compressed file under any name is read), refuses a ``.gz`` name over
data that is not gzip, and caps the decompressed size against decompression bombs.
:func:`regular_file` (readers that seek: models, properties, arrays) and :func:`open_input` /
:func:`read_text` (plans, knobs, configurations, CSV and import files, which may also come
from a pipe) guard the reads of files a user names: a device given as a file could be read
for ever (``/dev/zero``) and a FIFO with no writer would block, so neither is read; text is
size-capped.
"""

from __future__ import annotations

import gzip
import os
import stat
import zlib
from pathlib import Path
from typing import BinaryIO

from boundflow.errors import BoundFlowError

GZIP_MAGIC = b"\x1f\x8b"
MAX_DECOMPRESSED_BYTES = 2 * 1024 ** 3      # 2 GiB, the most one protobuf message may hold
MAX_TEXT_BYTES = 256 << 20                  # plan, knobs, configuration and CSV files
_CHUNK = 1 << 20


def regular_file(path: str | Path, error: type[BoundFlowError], what: str) -> os.stat_result:
    """``path``'s status when it is a regular file (links followed), else ``error`` with
    one line: missing, unreadable, a directory, or a device, FIFO or socket."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise error(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{path}: the {what} is a directory; give a file")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: the {what} is not a regular file (a device, pipe or socket); "
                    f"give a file")
    return st


def open_input(path: str | Path, error: type[BoundFlowError], what: str) -> BinaryIO:
    """``path`` opened for reading when it is a regular file or a pipe (``<(...)``, a FIFO
    with a writer; one with none reads as empty at once instead of blocking): opened without
    blocking, then checked on the open file (no window for a swap), then set to block. A
    directory or device raises ``error`` with one line."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise error(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise error(f"{path}: the {what} is a directory; give a file")
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
            raise error(f"{path}: the {what} is not a regular file (a device or socket); "
                        f"give a file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_text(path: str | Path, error: type[BoundFlowError], what: str,
              limit: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of the file or pipe ``path`` (``open_input``), at most ``limit``
    bytes; every failure raises ``error`` with one line naming ``path`` and ``what``."""
    chunks, total = [], 0
    with open_input(path, error, what) as f:
        try:
            while chunk := f.read(_CHUNK):
                total += len(chunk)
                if total > limit:
                    raise error(f"{path}: the {what} is over the limit of {limit:,} bytes")
                chunks.append(chunk)
        except OSError as e:
            raise error(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: the {what} is not UTF-8 text ({e.reason} at byte "
                    f"{e.start})") from None


def read_bytes(path: str | Path, error: type[BoundFlowError], what: str) -> bytes:
    """The contents of ``path``, decompressed when they are gzip data.

    Every failure raises ``error`` with one line naming ``path`` (``what`` names the kind of
    file, e.g. "ONNX model"): a missing or unreadable file, a name ending in ``.gz`` over data
    that is not gzip, corrupt or truncated gzip data, and data that decompresses to more than
    :data:`MAX_DECOMPRESSED_BYTES` (read at call time), and a path that is not a regular
    file or holds more than that.
    """
    path = Path(path)
    st = regular_file(path, error, what)
    if st.st_size > MAX_DECOMPRESSED_BYTES:
        raise error(f"{path}: the {what} is {st.st_size:,} bytes, over the limit of "
                    f"{MAX_DECOMPRESSED_BYTES:,}")
    try:
        with open(path, "rb") as f:
            if f.read(2) == GZIP_MAGIC:
                f.seek(0)
                return _gunzip(f, path, error)
            if path.suffix.lower() == ".gz":
                raise error(f"{path}: the name ends in .gz but the file is not gzip data "
                            f"(it does not start with the bytes 1f 8b); recompress it or "
                            f"rename it")
            f.seek(0)
            data = f.read(st.st_size + 1)
            if len(data) > MAX_DECOMPRESSED_BYTES:
                raise error(f"{path}: the {what} is over the limit of "
                            f"{MAX_DECOMPRESSED_BYTES:,} bytes")
            return data
    except OSError as e:
        raise error(f"{path}: cannot read the {what}: {e.strerror or e}") from None


def _gunzip(f: BinaryIO, path: Path, error: type[BoundFlowError]) -> bytes:
    """Decompress ``f`` in chunks, stopping as soon as the output passes the cap."""
    limit = MAX_DECOMPRESSED_BYTES
    chunks, total = [], 0
    try:
        with gzip.GzipFile(fileobj=f, mode="rb") as z:
            while chunk := z.read(_CHUNK):
                total += len(chunk)
                if total > limit:
                    raise error(f"{path}: decompresses to more than {limit:,} bytes (the "
                                f"limit); refusing it as a possible decompression bomb")
                chunks.append(chunk)
    except (OSError, EOFError, zlib.error) as e:     # gzip.BadGzipFile is an OSError
        raise error(f"{path}: corrupt or truncated gzip data ({str(e) or type(e).__name__}); "
                    f"download or compress it again") from None
    return b"".join(chunks)
