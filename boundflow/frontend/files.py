"""Reading model and property files, plain or gzip-compressed.

VNN-COMP ships its instances as ``.onnx.gz`` and ``.vnnlib.gz``. :func:`read_bytes` tells gzip
data by its magic bytes (a compressed file under any name is read), refuses a ``.gz`` name over
data that is not gzip, and caps the decompressed size against decompression bombs.
:func:`regular_file` and :func:`read_text` are the guard every other file read goes through:
a device, FIFO or socket given as a file could be read forever (``/dev/zero``) or block
(a FIFO with no writer), so only regular files are opened, and text files are size-capped.
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


def read_text(path: str | Path, error: type[BoundFlowError], what: str,
              limit: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of the regular file ``path`` (at most ``limit`` bytes); every failure
    raises ``error`` with one line naming ``path`` and ``what``."""
    st = regular_file(path, error, what)
    if st.st_size > limit:
        raise error(f"{path}: the {what} is {st.st_size:,} bytes, over the limit of "
                    f"{limit:,}")
    try:
        with open(path, "rb") as f:
            data = f.read(st.st_size + 1)
    except OSError as e:
        raise error(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    if len(data) > limit:
        raise error(f"{path}: the {what} is over the limit of {limit:,} bytes")
    try:
        return data.decode("utf-8")
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
