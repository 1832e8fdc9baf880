"""Recipe validation: every bad recipe fails before any training, naming key, value, rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from tieify import RecipeError
from tieify.search._recipe import Recipe, builtin_recipes, load_recipe, recipe_from_dict


def test_default_recipe_loads_and_round_trips() -> None:
    r = load_recipe(None, {})
    assert r.name == "default"
    assert r.data.dataset == "digits"
    assert r.model.name == "cifar_resnet"
    assert r.directions == ["maximize", "minimize", "minimize"]
    again = recipe_from_dict(r.to_dict())
    assert again == r
    assert {"default", "resnet18-cifar10", "imagefolder"} <= set(builtin_recipes())


def test_overrides_dotted_and_nested() -> None:
    r = load_recipe("default", {"budgets.max_params": 1234, "search": {"trials": 3}})
    assert r.budgets.max_params == 1234 and r.search.trials == 3
    ratio = load_recipe(
        "default",
        {"budgets.max_latency_ratio": 0.5, "search.objectives": ["accuracy", "latency_ratio"]},
    )
    assert ratio.budgets.max_latency_ratio == 0.5
    assert ratio.directions == ["maximize", "minimize"]
    # None values (unset CLI flags) are ignored
    assert load_recipe("default", {"budgets.max_params": None}).budgets.max_params == 60000


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"modle": {}}, ["modle", "allowed top-level keys", "model"]),
        ({"train": {"learning_rate": 0.1}}, ["train.learning_rate", "0.1", "lr"]),
        ({"train": {"epochs": "two"}}, ["train.epochs", "'two'", "int"]),
        ({"train": {"lr": True}}, ["train.lr", "True", "float"]),
        ({"budgets": {"max_accuracy_drop": 5}}, ["budgets.max_accuracy_drop", "[0, 1]", "5"]),
        ({"budgets": {"min_accuracy": 1.5}}, ["budgets.min_accuracy", "1.5"]),
        ({"budgets": {"max_params": 0}}, ["budgets.max_params", "> 0", "0"]),
        ({"budgets": {"max_latency_ms": -1.0}}, ["budgets.max_latency_ms", "-1.0"]),
        ({"budgets": {"max_latency_ratio": 0}}, ["budgets.max_latency_ratio", "> 0", "0"]),
        (
            {"budgets": {"max_latency_ratio": 50}},
            ["budgets.max_latency_ratio", "(0, 2]", "50", "0.5 for 50%"],
        ),
        ({"train": {"optimizer": "adam"}}, ["train.optimizer", "sgd, adamw", "'adam'"]),
        ({"data": {"dataset": "mnist"}}, ["data.dataset", "digits", "'mnist'"]),
        ({"search": {"objectives": ["accuracy", "speed"]}}, ["search.objectives", "'speed'"]),
        ({"search": {"choices": [0, 2]}}, ["search.choices", "[0, 2]"]),
        ({"search": {"space": "diagonal"}}, ["search.space", "per_stage", "'diagonal'"]),
        ({"search": {"trials": 0}}, ["search.trials", "> 0"]),
        ({"data": {"val_fraction": 1.0}}, ["data.val_fraction", "(0, 1)"]),
        ({"version": 7}, ["version", "7"]),
        (
            {"latency": {"allocator": "jemalloc"}},
            ["latency.allocator", "tuned, system", "'jemalloc'"],
        ),
    ],
)
def test_bad_recipes_name_key_value_and_rule(raw: dict, words: list[str]) -> None:
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(raw)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_impossible_accuracy_budget_without_training() -> None:
    with pytest.raises(RecipeError, match="accuracy budgets need a trained model"):
        recipe_from_dict(
            {
                "train": {"epochs": 0},
                "model": {"pretrain_epochs": 0},
                "budgets": {"min_accuracy": 0.9},
            }
        )


def test_missing_data_paths(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="data.root.*train"):
        recipe_from_dict({"data": {"dataset": "imagefolder", "root": str(tmp_path / "nope")}})
    with pytest.raises(RecipeError, match="cifar-10-batches-py.*download"):
        recipe_from_dict({"data": {"dataset": "cifar10", "root": str(tmp_path)}})
    # download: true is allowed without the folder (the loader fetches it)
    r = recipe_from_dict({"data": {"dataset": "cifar10", "root": str(tmp_path), "download": True}})
    assert r.data.download is True
    with pytest.raises(RecipeError, match="model.checkpoint"):
        recipe_from_dict({"model": {"checkpoint": str(tmp_path / "x.pt")}})


def test_recipe_file_relative_paths_and_errors(tmp_path: Path) -> None:
    (tmp_path / "imgs" / "train" / "a").mkdir(parents=True)
    path = tmp_path / "r.yaml"
    path.write_text("name: mine\ndata: {dataset: imagefolder, root: imgs}\n")
    r = load_recipe(str(path), {})
    assert r.name == "mine"
    assert r.data.root == str((tmp_path / "imgs").resolve())
    with pytest.raises(RecipeError, match="unknown recipe 'nosuch'.*default"):
        load_recipe("nosuch", {})
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(str(bad), {})
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(str(tmp_path / "missing.yaml"), {})


def test_recipe_is_frozen() -> None:
    r = Recipe()
    with pytest.raises(AttributeError):
        r.name = "x"  # type: ignore[misc]


def test_cli_rejects_bad_budget_before_training(tmp_path: Path, capsys) -> None:
    from tieify.cli import main

    code = main(["search", "--max-accuracy-drop", "3", "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "budgets.max_accuracy_drop" in err and "3.0" in err
    assert not (tmp_path / "o").exists()


def test_cli_max_latency_ratio_reaches_the_recipe(tmp_path: Path, capsys) -> None:
    from tieify.cli import main

    code = main(["search", "--max-latency-ratio", "60", "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "budgets.max_latency_ratio" in err and "60.0" in err and "0.5 for 50%" in err
    assert not (tmp_path / "o").exists()
