"""Data loaders on real digits and on CIFAR / ImageFolder fixtures written by the tests."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from tieify import RecipeError
from tieify.search._data import load_data
from tieify.search._recipe import DataConfig


def test_digits_split_is_deterministic_and_disjoint() -> None:
    cfg = DataConfig(dataset="digits", image_size=8, val_fraction=0.25, seed=5)
    a, b = load_data(cfg), load_data(cfg)
    assert len(a.train) + len(a.val) == 1797
    assert len(a.val) == round(1797 * 0.25)
    torch.testing.assert_close(a.train.tensors[0], b.train.tensors[0])
    # real 8x8 digits, scaled to [-1, 1], 3 channels: no image in both splits
    x_tr, x_va = a.train.tensors[0], a.val.tensors[0]
    assert x_tr.shape[1:] == (3, 8, 8) and float(x_tr.min()) == -1.0 and float(x_tr.max()) == 1.0
    flat_tr = {tuple(v.tolist()) for v in x_tr[:, 0].flatten(1)}
    overlap = sum(tuple(v.tolist()) in flat_tr for v in x_va[:, 0].flatten(1))
    assert overlap <= 5  # a few digits are pixel-identical duplicates in the dataset itself
    other = load_data(DataConfig(dataset="digits", image_size=8, val_fraction=0.25, seed=6))
    assert not torch.equal(other.val.tensors[1], a.val.tensors[1])


def test_digits_resize_and_limits() -> None:
    d = load_data(DataConfig(image_size=16, max_train_samples=100, max_val_samples=40))
    assert (len(d.train), len(d.val), d.num_classes, d.input_size) == (100, 40, 10, (3, 16, 16))
    assert d.example_batch(3).shape == (3, 3, 16, 16)


def _write_cifar10(root: Path, n_train: int = 10, n_test: int = 6) -> np.ndarray:
    """The real cifar-10-batches-py layout: 5 pickled train batches, test_batch, meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    first = None
    for i, (name, n) in enumerate(
        [(f"data_batch_{b}", n_train) for b in range(1, 6)] + [("test_batch", n_test)]
    ):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        entry = {
            "batch_label": f"batch {i}",
            "labels": labels,
            "data": data,
            "filenames": [f"img{j}.png" for j in range(n)],
        }
        with (folder / name).open("wb") as fh:
            pickle.dump(entry, fh, protocol=2)
        if first is None:
            first = data
    with (folder / "batches.meta").open("wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072}, fh)
    assert first is not None
    return first


def test_cifar10_pickle_format(tmp_path: Path) -> None:
    first = _write_cifar10(tmp_path)
    d = load_data(DataConfig(dataset="cifar10", root=str(tmp_path), image_size=32))
    assert (len(d.train), len(d.val), d.num_classes) == (50, 6, 10)
    x, y = d.train[0]
    # channel-major rows of 1024 values, normalized with CIFAR's mean/std
    img = torch.from_numpy(first[0].reshape(3, 32, 32).astype(np.float32)) / 255.0
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    torch.testing.assert_close(x, (img - mean) / std)
    small = load_data(
        DataConfig(dataset="cifar10", root=str(tmp_path), image_size=8, max_train_samples=7)
    )
    assert len(small.train) == 7 and small.train[0][0].shape == (3, 8, 8)


def test_cifar100_and_missing_file(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 8), ("test", 4)):
        entry = {
            "data": np.zeros((n, 3072), np.uint8),
            "fine_labels": list(range(90, 90 + n)),
            "coarse_labels": [0] * n,
        }
        with (folder / name).open("wb") as fh:
            pickle.dump(entry, fh)
    d = load_data(DataConfig(dataset="cifar100", root=str(tmp_path), image_size=32))
    assert d.num_classes == 100 and [int(d.val[i][1]) for i in range(4)] == [90, 91, 92, 93]
    (folder / "test").unlink()
    with pytest.raises(RecipeError, match="cifar-100-python/test is missing"):
        load_data(DataConfig(dataset="cifar100", root=str(tmp_path)))


def _write_images(root: Path, classes: list[str], n: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(1)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")


def test_imagefolder_with_and_without_val(tmp_path: Path) -> None:
    _write_images(tmp_path / "a" / "train", ["cat", "dog", "eel"], 4)
    _write_images(tmp_path / "a" / "val", ["cat", "dog", "eel"], 2)
    d = load_data(DataConfig(dataset="imagefolder", root=str(tmp_path / "a"), image_size=8))
    assert (len(d.train), len(d.val), d.num_classes) == (12, 6, 3)
    x, y = d.val[5]
    assert x.shape == (3, 8, 8) and int(y) == 2
    _write_images(tmp_path / "b" / "train", ["x", "y"], 5)
    d2 = load_data(
        DataConfig(dataset="imagefolder", root=str(tmp_path / "b"), image_size=8, val_fraction=0.2)
    )
    assert (len(d2.train), len(d2.val), d2.num_classes) == (8, 2, 2)
