"""``disttrain data export text DIR SOURCE...``: text files as a byte-level token directory (tokens.py).

One document per file, its tokens the file's bytes (ids 0..255, vocabulary 256; UTF-8 text stays byte by
byte). ``--eos`` appends an end-of-document token, id 256, to every document (vocabulary 257): a packed window
(``data.pack: true``) then sees where one document ends and the next begins. A SOURCE is a file, or a folder
whose files matching ``--pattern`` (every file, by default) are taken recursively in sorted order; hidden files
and folders are skipped, and so are files that are not text (not UTF-8, or holding a NUL byte) or empty.

Any text a machine has works with no download: the Python standard library's own ``.py`` files, say. The
tokens are written through a memory map, a file at a time, so an export of any size needs the memory of its
largest file; two exports of the same files are byte-identical.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .tokens import DOCUMENTS, TOKENS, write_meta

BYTES = 256  # the byte-level vocabulary; the end-of-document token, when written, is id 256


def _files(sources: list[Path], pattern: str) -> list[Path]:
    files: list[Path] = []
    for source in sources:
        if source.is_file():
            files.append(source)
        elif source.is_dir():
            files += sorted(p for p in source.rglob(pattern) if p.is_file()
                            and not any(part.startswith(".") for part in p.relative_to(source).parts))
        else:
            raise ConfigError(f"data export text: {source} does not exist")
    return files


def _text(path: Path) -> bytes | None:
    """The file's bytes if it is non-empty text (UTF-8 without NUL bytes), else None."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"data export text: cannot read {path}: {exc.strerror or exc}") from None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return data if data and b"\0" not in data else None


def export_text(out_dir: Path, sources: list[Path], eos: bool = False, pattern: str = "*") -> str:
    """Write the token directory; a one-line summary of what was written."""
    if not sources:
        raise ConfigError("data export text: name at least one SOURCE (a text file, or a folder of them)")
    candidates = _files(sources, pattern)
    documents = [(path, len(data)) for path in candidates if (data := _text(path)) is not None]
    if not documents:
        raise ConfigError(f"data export text: no non-empty text file in {', '.join(map(str, sources))} "
                          f"(pattern {pattern!r})")
    lengths = np.array([size + eos for _, size in documents], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tokens = np.lib.format.open_memmap(out_dir / TOKENS, mode="w+", dtype=np.uint16 if eos else np.uint8,
                                           shape=(int(offsets[-1]),))
        for (path, size), start in zip(documents, offsets[:-1]):
            data = _text(path)
            if data is None or len(data) != size:
                raise ConfigError(f"data export text: {path} changed while it was exported")
            tokens[start: start + size] = np.frombuffer(data, dtype=np.uint8)
            if eos:
                tokens[start + size] = BYTES
        tokens.flush()
        del tokens
        np.save(out_dir / DOCUMENTS, offsets)
        write_meta(out_dir, BYTES + eos, BYTES if eos else None)
    except OSError as exc:
        raise ConfigError(f"data export text: cannot write under {out_dir}: {exc.strerror or exc}") from None
    skipped = len(candidates) - len(documents)
    return (f"wrote {len(documents)} documents, {int(offsets[-1])} tokens (vocabulary {BYTES + eos}) to {out_dir}"
            + (f"; skipped {skipped} files that are not text or are empty" if skipped else ""))


__all__ = ["export_text", "BYTES"]
