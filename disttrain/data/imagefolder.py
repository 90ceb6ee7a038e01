"""``data.name: imagefolder``: DIR/CLASS_NAME/*.png|jpg|jpeg, decoded with Pillow as batches need them.

Opening lists the files (labels: the index of the class folder in sorted order); no image is decoded until a
batch needs it. Each image is converted to RGB and scaled to float (3, H, W) in [0, 1], resized to
data.image_size when it is set (bilinear, Pillow's resampling); without it every image must have the size of the
first, and one that does not is an error naming it. A file that cannot be decoded is an error naming it too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config.schema import DataConfig
from ..errors import ConfigError
from .disk import DataReadError, Normalize, data_dir, subset
from .source import Source

EXTENSIONS = (".png", ".jpg", ".jpeg")


def scan(directory: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """The class names (sorted) and every (image file, label), in sorted order."""
    classes = sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ConfigError(f"data.path: {directory} has no class folders (expected DIR/CLASS_NAME/*.png|jpg|jpeg)")
    files = []
    for label, name in enumerate(classes):
        images = sorted(p for p in (directory / name).iterdir() if p.suffix.lower() in EXTENSIONS and p.is_file())
        if not images:
            raise ConfigError(f"data.path: class folder {directory / name} has no .png, .jpg or .jpeg images")
        files += [(p, label) for p in images]
    return classes, files


def _decode(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    """The image at ``path`` as uint8 (H, W, 3), resized to ``size`` = (H, W) when given."""
    from PIL import Image  # Pillow: a dependency of the data formats only

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if size is not None and image.size != (size[1], size[0]):
                image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            return np.asarray(image)
    except (OSError, ValueError, SyntaxError) as exc:  # PIL.UnidentifiedImageError is an OSError
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataReadError(f"data.path: cannot decode {path}: {reason}") from None


class ImageFolderSource(Source):
    def __init__(self, cfg: DataConfig, seed: int, dtype: torch.dtype):
        try:
            from PIL import Image  # noqa: F401
        except ImportError:
            raise ConfigError("data.name=imagefolder needs Pillow: pip install 'disttrain[data]'") from None
        directory = data_dir(cfg)
        self.classes, files = scan(directory)
        keep = subset(len(files), cfg, seed, str(directory))
        self.files = [files[i][0] for i in keep]
        self.labels = torch.tensor([files[i][1] for i in keep], dtype=torch.long)
        self.num_classes = len(self.classes)
        self.size = tuple(cfg.image_size) if cfg.image_size else None
        first = _decode(self.files[0], self.size)
        self._shape = (3, first.shape[0], first.shape[1])
        self.dtype = dtype
        self.normalize = Normalize(cfg, 3, dtype)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._shape

    def fetch(self, indices: np.ndarray, keys: object = None) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = self._shape[1:]
        batch = np.empty((len(indices), h, w, 3), dtype=np.uint8)
        for i, index in enumerate(indices):
            image = _decode(self.files[index], self.size)
            if image.shape[:2] != (h, w):
                raise DataReadError(f"data.path: {self.files[index]} is {image.shape[1]}x{image.shape[0]} but "
                                    f"{self.files[0]} is {w}x{h}; set data.image_size: [H, W] to resize them all")
            batch[i] = image
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(self.dtype).div_(255)
        return self.normalize(x.contiguous()), self.labels[torch.as_tensor(indices)]


def open_source(cfg: DataConfig, model_name: str, seed: int, dtype: torch.dtype, loss: str) -> ImageFolderSource:
    """The format's entry in formats.FORMATS."""
    return ImageFolderSource(cfg, seed, dtype)


__all__ = ["ImageFolderSource", "scan", "EXTENSIONS", "open_source"]
