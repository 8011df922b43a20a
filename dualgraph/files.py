"""Reading input files: gzip-compressed ones (``.gz``, as VNN-COMP distributes its
``.onnx.gz`` and ``.vnnlib.gz`` files) are decompressed transparently."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

from .errors import DualgraphError


def read_bytes(path: str | Path, what: str) -> bytes:
    """The contents of ``path`` (decompressed if it ends in ``.gz``); one-line errors."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise DualgraphError(f"'{path}' is a directory, not a {what}") from None
    except OSError as e:
        raise DualgraphError(f"cannot read {what} '{path}': {e.strerror}; check the path") from None
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DualgraphError(f"'{path}' is not a valid gzip file ({e}); decompress or re-download it") from None
    return data


def read_text(path: str | Path, what: str) -> str:
    """:func:`read_bytes` decoded as UTF-8, without a byte-order mark (an error names the file
    and the offset)."""
    data = read_bytes(path, what)
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise DualgraphError(f"'{path}' is not UTF-8 text (byte {e.start}); is it really a {what}?") from None


def check_writable(path: str | Path, what: str) -> None:
    """Raise a one-line error now if ``path`` cannot be written (a missing folder, a directory,
    no permission): checked before a long run, so that its answers are not lost at the end.
    Leaves an existing file as it is and removes one it had to create."""
    path = Path(path)
    if path.is_dir():
        raise DualgraphError(f"{what} '{path}' is a directory; give a file name")
    if not path.parent.is_dir():
        raise DualgraphError(f"cannot write {what} '{path}': folder '{path.parent}' does not exist; create it first")
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise DualgraphError(f"cannot write {what} '{path}': {e.strerror}") from None
    if not existed:
        path.unlink(missing_ok=True)


def make_folder(path: str | Path, what: str) -> Path:
    """``path`` created as a folder (with its parents) if it is not one; one-line errors."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DualgraphError(f"{what} '{path}' is a file, not a folder; give another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DualgraphError(f"cannot create {what} '{path}': {e.strerror}") from None
    return path
