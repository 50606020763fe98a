"""Reading model and property files, plain or gzip-compressed.

VNN-COMP ships its instances as ``.onnx.gz`` and ``.vnnlib.gz``. :func:`read_bytes` tells gzip
data by its magic bytes (a compressed file under any name is read), refuses a ``.gz`` name over
data that is not gzip, and caps the decompressed size against decompression bombs.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import BinaryIO

from boundflow.errors import BoundFlowError

GZIP_MAGIC = b"\x1f\x8b"
MAX_DECOMPRESSED_BYTES = 2 * 1024 ** 3      # 2 GiB, the most one protobuf message may hold
_CHUNK = 1 << 20


def read_bytes(path: str | Path, error: type[BoundFlowError], what: str) -> bytes:
    """The contents of ``path``, decompressed when they are gzip data.

    Every failure raises ``error`` with one line naming ``path`` (``what`` names the kind of
    file, e.g. "ONNX model"): a missing or unreadable file, a name ending in ``.gz`` over data
    that is not gzip, corrupt or truncated gzip data, and data that decompresses to more than
    :data:`MAX_DECOMPRESSED_BYTES` (read at call time).
    """
    path = Path(path)
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
            return f.read()
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
