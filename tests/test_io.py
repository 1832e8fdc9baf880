"""save / load: plan + weights, replayed on a fresh instance, tensors only."""

from __future__ import annotations

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
