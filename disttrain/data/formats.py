"""The data formats by name: the one place a format's name is listed.

A format is one module in data/ that defines ``open_source(cfg, model_name, seed, dtype, loss) -> Source`` (what a
dataset must offer: source.py), plus one line in :data:`FORMATS`. The schema (the default ``data.num_samples``), the
validator (which keys a format takes) and the loader (dataset.py) read this table; nothing else lists names.
This module imports nothing, so the schema can read it without importing torch or the readers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Format:
    module: str  # disttrain.data.<module>, imported when the format is opened
    on_disk: bool  # read from data.path while training (opened, never read whole); else built in memory


FORMATS = {
    "synthetic": Format("builtin", on_disk=False),
    "digits": Format("builtin", on_disk=False),
    "imagefolder": Format("imagefolder", on_disk=True),
    "arrays": Format("arrays", on_disk=True),
    "tokens": Format("tokens", on_disk=True),
}

ON_DISK = tuple(name for name, fmt in FORMATS.items() if fmt.on_disk)

__all__ = ["Format", "FORMATS", "ON_DISK"]
