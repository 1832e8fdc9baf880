"""Models torch.fx cannot trace: torchvision detection models fall back to a module walk."""

from __future__ import annotations

import pytest
import torch
import torchvision

import tieify


@pytest.mark.slow
def test_detection_model_is_tied_through_the_module_walk() -> None:
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3
    ).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = tieify.plan(model, B=2)
    assert not p.traced
    assert any("attention detection" in note for note in p.notes)
    assert p.tied(), "nothing tied in the detection model"
    assert all(lp.reason for lp in p.layers if lp.action == "leave")
    tied = p.apply(model)
    for key, value in model.state_dict().items():  # the original is untouched
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    n_params = sum(x.numel() for x in model.parameters())
    assert sum(x.numel() for x in tied.parameters()) < n_params
    with torch.no_grad():
        (out,) = tied([torch.rand(3, 160, 160)])
    assert set(out) == {"boxes", "labels", "scores"}
