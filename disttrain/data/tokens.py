"""``data.name: tokens``: token sequences for language models, memory-mapped; a batch reads only its tokens.

data.path is one of
- a token directory (what ``disttrain data export text`` writes): ``tokens.npy``, every document's tokens
  one after another (a flat integer array); ``documents.npy``, the D + 1 offsets of the D documents (document
  d is ``tokens[offsets[d]:offsets[d + 1]]``); ``meta.json``, ``{"vocab_size": V, "eos_token": id or null}``;
- nanoGPT's ``train.bin`` (a flat uint16 file, no header, no document boundaries), or a directory holding
  one: packed windows only, and ``data.vocab_size`` must be set.

Samples, with T = data.seq_len. Each sample is T + 1 consecutive tokens at most: input = chunk[:-1],
target = chunk[1:], so a sample has at most T targets.
- Documents (the default): each document is cut into chunks of at most T + 1 tokens, consecutive chunks sharing
  one token, so each of a document's L - 1 next-token targets is in exactly one sample and no target crosses a
  document boundary. A document's last chunk is shorter: its input is right-padded with token 0 and its target
  with -100 (ignored), so samples hold different numbers of target tokens (a document of one token holds none
  and gives no sample).
- Packed (``data.pack: true``): the token stream cut into windows of T + 1 tokens sharing one token, across
  document boundaries (nanoGPT's sampling, on fixed windows): every sample has T targets; the tokens after the
  last whole window are not used.

Opening maps the tokens (never read whole) and reads the offsets (one integer per document) to index the
chunks: sample s is found by a binary search over the cumulative chunk counts, so any sample, and any step, is
read in O(log D) with no state: resume is O(1) and a step's samples do not depend on the world size or the
loader workers. The map is reopened in each process that reads (a loader worker), never pickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..config.schema import DataConfig
from ..errors import ConfigError
from .disk import DataReadError, FileRows, subset
from .source import Source

TOKENS, DOCUMENTS, META, NANOGPT = "tokens.npy", "documents.npy", "meta.json", "train.bin"
IGNORE = -100  # a target that is not a token: padding (torch's and Hugging Face's ignore_index)
PAD = 0  # the input id of padding: any valid id, its targets are ignored


def write_tokens(directory: Path, tokens: np.ndarray, offsets: np.ndarray, vocab_size: int,
                 eos_token: int | None = None) -> None:
    """A token directory from arrays in memory (tests, small exports); data/text.py streams large ones."""
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / TOKENS, tokens)
    np.save(directory / DOCUMENTS, np.asarray(offsets, dtype=np.int64))
    write_meta(directory, vocab_size, eos_token)


def write_meta(directory: Path, vocab_size: int, eos_token: int | None) -> None:
    (directory / META).write_text(json.dumps({"vocab_size": vocab_size, "eos_token": eos_token}) + "\n")


def _locate(path: Path) -> tuple[Path, bool]:
    """(the tokens file, whether it is a bare nanoGPT train.bin)."""
    if not path.exists():
        raise ConfigError(f"data.path: {path} does not exist")
    if path.is_file():
        if path.suffix != ".bin":
            raise ConfigError(f"data.path: {path} is a file; data.name=tokens reads a token directory (with "
                              f"{TOKENS}) or nanoGPT's {NANOGPT}")
        return path, True
    if (path / TOKENS).exists():
        return path / TOKENS, False
    if (path / NANOGPT).exists():
        return path / NANOGPT, True
    raise ConfigError(f"data.path: {path} holds neither {TOKENS} (a token directory: disttrain data export text) "
                      f"nor nanoGPT's {NANOGPT}")


def _map(file: Path, bare: bool) -> np.ndarray:
    """The tokens, memory-mapped (nothing is read)."""
    try:
        if bare:
            if file.stat().st_size % 2:
                raise ConfigError(f"data.path: {file} has an odd size ({file.stat().st_size} bytes); nanoGPT's "
                                  f"{NANOGPT} is a flat uint16 array")
            return np.memmap(file, dtype=np.uint16, mode="r")
        tokens = np.load(file, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"data.path: {file} is not a readable token array ({exc})") from None
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ConfigError(f"data.path: {file} has dtype {tokens.dtype} and shape {tokens.shape}; tokens must be a "
                          "flat integer array (N,)")
    return tokens


def _offsets(directory: Path, num_tokens: int) -> np.ndarray:
    file = directory / DOCUMENTS
    try:
        offsets = np.load(file, allow_pickle=False)
    except FileNotFoundError:
        raise ConfigError(f"data.path: no {DOCUMENTS} in {directory} (the document boundaries; data.pack=true "
                          "packs windows without them)") from None
    except (ValueError, OSError) as exc:
        raise ConfigError(f"data.path: {file} is not a readable .npy array ({exc})") from None
    if offsets.ndim != 1 or not np.issubdtype(offsets.dtype, np.integer) or len(offsets) < 2:
        raise ConfigError(f"data.path: {file} has dtype {offsets.dtype} and shape {offsets.shape}; expected the D + 1 "
                          "integer offsets of D >= 1 documents")
    offsets = offsets.astype(np.int64)
    if offsets[0] != 0 or offsets[-1] != num_tokens or (np.diff(offsets) < 0).any():
        raise ConfigError(f"data.path: {file} must rise from 0 to the {num_tokens} tokens of {TOKENS}; it goes from "
                          f"{offsets[0]} to {offsets[-1]}" + (", falling on the way" if (np.diff(offsets) < 0).any()
                                                               else ""))
    return offsets


def _vocab_size(cfg: DataConfig, directory: Path | None) -> int:
    """data.vocab_size, checked against what the directory records (0: the recorded one)."""
    recorded = 0
    if directory is not None and (directory / META).exists():
        try:
            recorded = int(json.loads((directory / META).read_text())["vocab_size"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"data.path: {directory / META} has no integer vocab_size ({exc})") from None
    if cfg.vocab_size == 0:
        if recorded == 0:
            raise ConfigError(f"data.vocab_size: {cfg.path} records no vocabulary; set data.vocab_size (nanoGPT's "
                              "GPT-2 tokens: 50257)")
        return recorded
    if cfg.vocab_size < recorded:
        raise ConfigError(f"data.vocab_size: {cfg.vocab_size} is too small for {cfg.path}, whose token ids go up to "
                          f"{recorded - 1} (vocabulary {recorded})")
    return cfg.vocab_size


class TokenSource(Source):
    """Token sequences; ``fetch`` returns inputs and targets (n, T), int64, targets padded with -100."""

    def __init__(self, cfg: DataConfig, seed: int):
        self.file, bare = _locate(Path(cfg.path).expanduser())
        self.bare, self.seq_len, self.pack = bare, cfg.seq_len, cfg.pack
        if bare and not cfg.pack:
            raise ConfigError(f"data.pack: {self.file} is nanoGPT's flat {NANOGPT}, with no document boundaries; "
                              "set data.pack=true (fixed windows of data.seq_len tokens)")
        tokens = _map(self.file, bare)
        self.num_classes = _vocab_size(cfg, None if bare else self.file.parent)
        T = cfg.seq_len
        if cfg.pack:
            chunks = np.array([max(0, (len(tokens) - 1) // T)])
            self.starts = np.array([0], dtype=np.int64)
            self.stops = np.array([len(tokens)], dtype=np.int64)
        else:
            offsets = _offsets(self.file.parent, len(tokens))
            self.starts, self.stops = offsets[:-1], offsets[1:]
            chunks = -(-np.maximum(self.stops - self.starts - 1, 0) // T)  # ceil((L - 1) / T) per document
        self.ends = np.cumsum(chunks)  # the chunks of documents 0..d: sample s is in the first d with ends[d] > s
        total = int(self.ends[-1])
        if total == 0:
            raise ConfigError(f"data.path: {self.file} has no sample of data.seq_len={T}: " +
                              ("fewer than T + 1 tokens" if cfg.pack else "no document of two tokens or more"))
        self.rows = subset(total, cfg, seed, str(self.file))
        self._tokens = FileRows(self.file, tokens)  # each sample's span read with pread (disk.FileRows says why)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.seq_len,)

    @property
    def bytes_read(self) -> int:
        """Bytes this process has read from the token file so far (bench data reports them per sample)."""
        return self._tokens.bytes_read

    def spans(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The [start, stop) token positions of the samples at ``indices``: O(log D) each, no state."""
        chunk = self.rows[np.asarray(indices, dtype=np.int64)]
        document = np.searchsorted(self.ends, chunk, side="right")
        first = np.where(document > 0, self.ends[document - 1], 0)  # the document's first chunk
        start = self.starts[document] + (chunk - first) * self.seq_len
        return start, np.minimum(start + self.seq_len + 1, self.stops[document])

    def fetch(self, indices: np.ndarray, keys: object = None) -> tuple[torch.Tensor, torch.Tensor]:
        T, V = self.seq_len, self.num_classes
        x = np.full((len(indices), T), PAD, dtype=np.int64)
        y = np.full((len(indices), T), IGNORE, dtype=np.int64)
        for i, (start, stop) in enumerate(zip(*self.spans(indices))):
            try:
                chunk = self._tokens.span(int(start), int(stop)).astype(np.int64)
            except OSError as exc:
                raise DataReadError(f"data.path: cannot read {self.file}: {exc}") from None
            if len(chunk) and (chunk.max() >= V or chunk.min() < 0):
                bad = int(chunk[(chunk >= V) | (chunk < 0)][0])
                raise DataReadError(f"data.path: {self.file} holds token id {bad} (near position {start}), outside "
                                    f"[0, data.vocab_size={V})")
            x[i, : len(chunk) - 1] = chunk[:-1]
            y[i, : len(chunk) - 1] = chunk[1:]
        return torch.from_numpy(x), torch.from_numpy(y)


def open_source(cfg: DataConfig, model_name: str, seed: int, dtype: torch.dtype, loss: str) -> TokenSource:
    """The format's entry in formats.FORMATS."""
    return TokenSource(cfg, seed)


__all__ = ["TokenSource", "open_source", "write_tokens", "write_meta", "TOKENS", "DOCUMENTS", "META", "NANOGPT",
           "IGNORE"]
