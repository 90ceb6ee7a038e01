"""``disttrain data export NAME DIR``: ``text`` (files as byte-level tokens: text.py), or ``digits``: scikit-learn's 1,797 8x8 handwritten digits as PNG files in class
folders (DIR/0/0000.png ... DIR/8/1796.png), a real image folder to train ``data.name: imagefolder`` on.

Pixel values 0..16 become grey levels 0..255 (x * 255 // 16); files are named by the sample's index in
scikit-learn's order, so two exports are byte-identical. Writing over an earlier export is allowed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ConfigError

DATASETS = ("digits", "text")


def export_digits(out_dir: Path) -> int:
    """Write the digits under ``out_dir``; the number of images written."""
    try:
        from PIL import Image
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError("data export digits needs Pillow and scikit-learn: pip install 'disttrain[data]'") from None
    digits = load_digits()
    images = (digits.images * 255 // 16).astype(np.uint8)
    try:
        for label in range(10):
            (out_dir / str(label)).mkdir(parents=True, exist_ok=True)
        for index, (image, label) in enumerate(zip(images, digits.target)):
            Image.fromarray(image, mode="L").save(out_dir / str(label) / f"{index:04d}.png")
    except OSError as exc:
        raise ConfigError(f"data export: cannot write under {out_dir}: {exc.strerror or exc}") from None
    return len(images)


def export(name: str, out_dir: Path, sources: list[Path] | None = None, eos: bool = False, pattern: str = "*") -> str:
    """Write dataset ``name`` under ``out_dir``; a one-line summary. ``sources``, ``eos``, ``pattern``: text's."""
    if name not in DATASETS:
        raise ConfigError(f"data export: unknown dataset {name!r} (choose from {', '.join(DATASETS)})")
    if name == "text":
        from .text import export_text

        return export_text(out_dir, sources or [], eos, pattern)
    if sources:
        raise ConfigError(f"data export digits: takes no SOURCE, got {' '.join(map(str, sources))}")
    return f"wrote {export_digits(out_dir)} images to {out_dir} (one folder per class)"


__all__ = ["export", "export_digits", "DATASETS"]
