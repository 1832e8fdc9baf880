"""Tiny recipes shared by the search tests (kept small: 8×8 digits, a 4-wide ResNet-8)."""

from __future__ import annotations

from typing import Any


def tiny_recipe(**sections: dict[str, Any]) -> dict[str, Any]:
    """A recipe dict that trains in well under a second per trial on one core."""
    raw: dict[str, Any] = {
        "name": "tiny",
        "model": {"name": "cifar_resnet", "kwargs": {"depth": 8, "width": 4}, "pretrain_epochs": 1},
        "data": {
            "dataset": "digits",
            "image_size": 8,
            "max_train_samples": 128,
            "max_val_samples": 64,
            "batch_size": 32,
        },
        "train": {"epochs": 1, "lr": 0.05, "threads": 1},
        "latency": {"repeats": 3, "warmup": 1},
        "budgets": {},
        "search": {
            "space": "per_stage",
            "population_size": 2,
            "trials": 2,
            "save_weights": True,
        },
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw
