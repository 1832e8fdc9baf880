"""Datasets for search: scikit-learn's digits, CIFAR-10/100 and ImageFolder.

Every loader returns a :class:`Data` with a training split and a held-out validation split,
both deterministic given ``DataConfig.seed``:

- ``digits``: the 1,797 real 8×8 handwritten digits bundled with scikit-learn (no download),
  scaled to [0, 1], resized bilinearly to ``image_size``, repeated to 3 channels, normalized,
  then split by a seeded permutation (``val_fraction`` held out).
- ``cifar10`` / ``cifar100``: the official python pickle batches (``cifar-10-batches-py`` /
  ``cifar-100-python`` under ``root``), read directly; ``download: true`` first fetches and
  checksums them through torchvision (needs network). The official test split is the
  validation split.
- ``imagefolder``: ``root/train/<class>/*`` (and ``root/val/<class>/*`` when present; otherwise
  ``val_fraction`` of train is held out), resized to ``image_size``.

Splits with at most :data:`MATERIALIZE_LIMIT` samples are decoded once into tensors, so that
the many short fine-tunes of a search do not decode images again.

Example:
    >>> from tieify.search._recipe import DataConfig
    >>> d = load_data(DataConfig(dataset="digits", image_size=16))
    >>> len(d.train) + len(d.val), d.num_classes, tuple(d.train[0][0].shape)
    (1797, 10, (3, 16, 16))
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from .._errors import RecipeError
from ._recipe import DataConfig

__all__ = ["Data", "load_data", "MATERIALIZE_LIMIT"]

MATERIALIZE_LIMIT = 20000
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Data:
    """A train/validation split with its number of classes and per-sample input size."""

    train: Dataset[Any]
    val: Dataset[Any]
    num_classes: int
    input_size: tuple[int, ...]

    def example_batch(self, batch_size: int = 1) -> torch.Tensor:
        """The first ``batch_size`` validation images stacked (for tracing and timing)."""
        n = min(batch_size, len(self.val))  # type: ignore[arg-type]
        xs = [self.val[i][0] for i in range(n)]
        while len(xs) < batch_size:
            xs.append(xs[len(xs) % n])
        return torch.stack(xs)


def _split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g).tolist()
    n_val = max(1, int(round(n * val_fraction)))
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def _limit(ds: Dataset[Any], limit: int | None, seed: int) -> Dataset[Any]:
    n = len(ds)  # type: ignore[arg-type]
    if limit is None or limit >= n:
        return ds
    g = torch.Generator().manual_seed(seed + 1)
    return Subset(ds, sorted(torch.randperm(n, generator=g)[:limit].tolist()))


def _materialize(ds: Dataset[Any]) -> Dataset[Any]:
    n = len(ds)  # type: ignore[arg-type]
    if n > MATERIALIZE_LIMIT or isinstance(ds, TensorDataset):
        return ds
    xs, ys = zip(*(ds[i] for i in range(n)), strict=True)
    return TensorDataset(torch.stack(list(xs)), torch.as_tensor(ys, dtype=torch.long))


def _digits(cfg: DataConfig) -> Data:
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = torch.as_tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if cfg.image_size != 8:
        x = torch.nn.functional.interpolate(
            x, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False
        )
    x = ((x - 0.5) / 0.5).repeat(1, 3, 1, 1).contiguous()
    y = torch.as_tensor(raw.target, dtype=torch.long)
    train_idx, val_idx = _split(len(y), cfg.val_fraction, cfg.seed)
    train: Dataset[Any] = TensorDataset(x[train_idx], y[train_idx])
    val: Dataset[Any] = TensorDataset(x[val_idx], y[val_idx])
    return Data(
        train=_materialize(_limit(train, cfg.max_train_samples, cfg.seed)),
        val=_materialize(_limit(val, cfg.max_val_samples, cfg.seed)),
        num_classes=10,
        input_size=(3, cfg.image_size, cfg.image_size),
    )


def _transform(size: int, native: int | None, mean: Any, std: Any) -> Any:
    from torchvision import transforms as T

    steps: list[Any] = []
    if native is None or size != native:
        steps.append(T.Resize((size, size)))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


class _Images(Dataset[Any]):
    """uint8 images (N, C, H, W) and labels; normalized (and resized) per item."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, size: int, mean: Any, std: Any):
        self.images, self.labels, self.size = images, labels, size
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __len__(self) -> int:
        return int(self.labels.numel())

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i].float().div(255.0)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = torch.nn.functional.interpolate(
                x[None], size=(self.size, self.size), mode="bilinear", align_corners=False
            )[0]
        return (x - self.mean) / self.std, int(self.labels[i])


_CIFAR_FILES = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "labels",
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels"),
}


def _read_cifar(folder: Path, files: list[str], key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read CIFAR's python pickle batches: ``{"data": uint8 (N, 3072), key: [labels]}``."""
    import pickle

    import numpy as np

    data, labels = [], []
    for name in files:
        path = folder / name
        if not path.is_file():
            raise RecipeError(
                f"recipe key 'data.root': CIFAR file {path} is missing; set data.download: true "
                "(needs network) or point data.root at the folder that holds "
                f"{folder.name}/."
            )
        with path.open("rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
        data.append(np.asarray(entry["data"], dtype=np.uint8))
        labels.extend(entry[key])
    images = torch.from_numpy(np.vstack(data).reshape(-1, 3, 32, 32).copy())
    return images, torch.as_tensor(labels, dtype=torch.long)


def _cifar(cfg: DataConfig, base_dir: str | None) -> Data:
    folder_name, train_files, test_files, key = _CIFAR_FILES[cfg.dataset]
    root = _root(cfg.root or "data", base_dir)
    if cfg.download:
        from torchvision import datasets

        cls = datasets.CIFAR10 if cfg.dataset == "cifar10" else datasets.CIFAR100
        cls(str(root), train=True, download=True)  # fetches and verifies the archive
    folder = root / folder_name
    num_classes = 100 if cfg.dataset == "cifar100" else 10
    splits = []
    for files in (train_files, test_files):
        images, labels = _read_cifar(folder, files, key)
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise RecipeError(
                f"{folder}: labels must lie in [0, {num_classes}), but got "
                f"[{int(labels.min())}, {int(labels.max())}]."
            )
        splits.append(_Images(images, labels, cfg.image_size, _CIFAR_MEAN, _CIFAR_STD))
    return Data(
        train=_materialize(_limit(splits[0], cfg.max_train_samples, cfg.seed)),
        val=_materialize(_limit(splits[1], cfg.max_val_samples, cfg.seed)),
        num_classes=num_classes,
        input_size=(3, cfg.image_size, cfg.image_size),
    )


def _imagefolder(cfg: DataConfig, base_dir: str | None) -> Data:
    from torchvision import datasets

    if cfg.root is None:
        raise RecipeError("recipe key 'data.root' must be set for dataset 'imagefolder'.")
    root = _root(cfg.root, base_dir)
    tf = _transform(cfg.image_size, None, _IMAGENET_MEAN, _IMAGENET_STD)
    try:
        full = datasets.ImageFolder(str(root / "train"), transform=tf)
    except (FileNotFoundError, RuntimeError) as exc:
        raise RecipeError(
            f"recipe key 'data.root' = {cfg.root!r}: no ImageFolder data under "
            f"{root / 'train'} ({exc})."
        ) from None
    if (root / "val").is_dir():
        train: Dataset[Any] = full
        val: Dataset[Any] = datasets.ImageFolder(str(root / "val"), transform=tf)
        if val.classes != full.classes:  # type: ignore[attr-defined]
            raise RecipeError(
                f"recipe key 'data.root' = {cfg.root!r}: train/ and val/ must hold the same "
                f"class folders, but got {full.classes} and {val.classes}."  # type: ignore[attr-defined]
            )
    else:
        train_idx, val_idx = _split(len(full), cfg.val_fraction, cfg.seed)
        train, val = Subset(full, train_idx), Subset(full, val_idx)
    return Data(
        train=_materialize(_limit(train, cfg.max_train_samples, cfg.seed)),
        val=_materialize(_limit(val, cfg.max_val_samples, cfg.seed)),
        num_classes=len(full.classes),
        input_size=(3, cfg.image_size, cfg.image_size),
    )


def _root(path: str, base_dir: str | None) -> Path:
    p = Path(os.path.expanduser(path))
    if not p.is_absolute() and base_dir is not None and (Path(base_dir) / p).exists():
        return Path(base_dir) / p
    return p


def load_data(cfg: DataConfig, base_dir: str | None = None) -> Data:
    """Load the recipe's dataset as deterministic train/validation splits.

    Args:
        cfg: The recipe's ``data`` section.
        base_dir: Folder relative ``root`` paths are also looked up in (the recipe's folder).

    Raises:
        RecipeError: missing or unreadable data.

    Example:
        >>> from tieify.search._recipe import DataConfig
        >>> load_data(DataConfig(image_size=8, val_fraction=0.5)).input_size
        (3, 8, 8)
    """
    if cfg.dataset == "digits":
        return _digits(cfg)
    if cfg.dataset in ("cifar10", "cifar100"):
        return _cifar(cfg, base_dir)
    if cfg.dataset == "imagefolder":
        return _imagefolder(cfg, base_dir)
    raise RecipeError(
        f"recipe key 'data.dataset' must be one of digits, cifar10, cifar100, imagefolder, "
        f"but got {cfg.dataset!r}."
    )
