"""save / load: plan + weights, replayed on a fresh instance, tensors only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import tieify
from tieify import PlanError


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip_on_fresh_instance(tmp_path: Path, suffix: str) -> None:
    model = torchvision.models.resnet18()
    tied = tieify.tieify(
        model, B={"layer4.*": 8, "*": 4}, groups={"layer1.*.conv2": 2}, mixer="concat"
    )
    with torch.no_grad():  # make the weights differ from a fresh replay
        for p in tied.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    tied.eval()
    path = tieify.save(tied, tmp_path / f"r18{suffix}")
    fresh = torchvision.models.resnet18()
    fresh_state = {k: v.clone() for k, v in fresh.state_dict().items()}
    again = tieify.load(fresh, path).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(again(x), tied(x), rtol=0, atol=0)
    assert again.tieify_plan == tied.tieify_plan
    assert all(torch.equal(v, fresh_state[k]) for k, v in fresh.state_dict().items())


def test_functional_parametrized_round_trip(tmp_path: Path) -> None:
    from test_apply import _Functional

    tied = tieify.tieify(_Functional(), B=2)
    path = tieify.save(tied, tmp_path / "f.safetensors")
    again = tieify.load(_Functional(), path)
    x = torch.randn(1, 3, 7, 7)
    torch.testing.assert_close(again(x), tied(x))


def test_errors(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(PlanError, match="carries no plan"):
        tieify.save(model, tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="must be an nn.Module"):
        tieify.save("model", tmp_path / "x.safetensors")  # type: ignore[arg-type]
    tied = tieify.tieify(model, B=2)
    path = tieify.save(tied, tmp_path / "t.safetensors")
    with pytest.raises(PlanError, match="holds a plan for torch.nn.modules.container.Sequential"):
        tieify.load(torchvision.models.resnet18(), path)
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3), nn.Flatten(), nn.Linear(16, 2))
    with pytest.raises(PlanError, match="expects in=8, out=8"):
        tieify.load(other, path)
    with pytest.raises(PlanError, match="no file"):
        tieify.load(model, tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(PlanError, match="holds no tieify plan"):
        tieify.load(model, tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(PlanError, match="not a safetensors file"):
        tieify.load(model, tmp_path / "junk.safetensors")
    with pytest.raises(TypeError, match="fresh instance"):
        tieify.load("resnet18", path)  # type: ignore[arg-type]


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (print, ("executed",))


def test_pt_loading_is_weights_only(tmp_path: Path) -> None:
    torch.save(
        {"format": "tieify-1", "plan": "{}", "state_dict": {}, "x": _Evil()}, tmp_path / "e.pt"
    )
    with pytest.raises(PlanError, match="weights_only=True"):
        tieify.load(nn.Linear(2, 2), tmp_path / "e.pt")
    torch.save({"format": "other"}, tmp_path / "o.pt")
    with pytest.raises(PlanError, match="was not written by tieify.save"):
        tieify.load(nn.Linear(2, 2), tmp_path / "o.pt")


class _Versioned(nn.Module):
    """A module whose loader needs its state-dict version, as torchvision's MNASNet does:
    version 1 stored the weight under an older key."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):  # type: ignore[no-untyped-def]
        version = local_metadata.get("version")
        if version not in (1, 2):
            raise ValueError(f"version should be 1 or 2, not {version}")
        if version == 1:
            state_dict[prefix + "conv.weight"] = state_dict.pop(prefix + "old_weight")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_state_dict_versions_travel_with_the_weights(tmp_path: Path, suffix: str) -> None:
    # MNASNet refuses a state without its version (ValueError): tieify.save keeps each
    # module's version, tieify.load hands it back
    model = torchvision.models.mnasnet0_5().eval()
    tied = tieify.tieify(model, B=4).eval()
    again = tieify.load(torchvision.models.mnasnet0_5(), tieify.save(tied, tmp_path / f"m{suffix}"))
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(again.eval()(x), tied(x), rtol=0, atol=0)

    # the saved version, not the rebuilt model's, reaches the loader: a version-1 state
    net = nn.Sequential(_Versioned(), nn.Conv2d(8, 8, 1))
    tied = tieify.tieify(net, B=2)
    path = tieify.save(tied, tmp_path / f"v{suffix}")
    text, tensors, versions = tieify._io._read(path)
    assert versions[""] == {"version": 1} and versions["0"] == {"version": 2}
    tensors["0.old_weight"] = tensors.pop("0.conv.weight")
    versions["0"]["version"] = 1
    if suffix == ".pt":
        torch.save(
            {"format": "tieify-1", "plan": text, "state_dict": tensors, "versions": versions}, path
        )
    else:
        from safetensors.torch import save_file

        save_file(
            tensors,
            str(path),
            metadata={"format": "tieify-1", "plan": text, "versions": json.dumps(versions)},
        )
    again = tieify.load(nn.Sequential(_Versioned(), nn.Conv2d(8, 8, 1)), path)
    x = torch.randn(1, 8, 5, 5)
    torch.testing.assert_close(again(x), tied(x), rtol=0, atol=0)

    # a file without versions (written before they were saved) loads with the rebuilt
    # model's own; a loader that still fails is a PlanError naming its error
    del versions["0"]
    tensors["0.conv.weight"] = tensors.pop("0.old_weight")
    torch.save({"format": "tieify-1", "plan": text, "state_dict": tensors}, tmp_path / "old.pt")
    again = tieify.load(nn.Sequential(_Versioned(), nn.Conv2d(8, 8, 1)), tmp_path / "old.pt")
    torch.testing.assert_close(again(x), tied(x), rtol=0, atol=0)
    broken = nn.Sequential(_Versioned(), nn.Conv2d(8, 8, 1))
    broken[0]._version = 3  # type: ignore[assignment]
    with pytest.raises(PlanError, match="ValueError: version should be 1 or 2, not 3"):
        tieify.load(broken, tmp_path / "old.pt")


def test_save_creates_directories_and_never_leaves_half_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tied = tieify.tieify(nn.Sequential(nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1)), B=2)
    for suffix in (".safetensors", ".pt"):
        path = tieify.save(tied, tmp_path / "a" / "b" / f"t{suffix}")
        assert path.is_file()
    before = path.read_bytes()

    def interrupted(obj: object, f: str) -> None:  # writes part of the file, then fails
        Path(f).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tieify.save(tied, path)
    assert path.read_bytes() == before  # the earlier checkpoint is whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["t.pt", "t.safetensors"]
