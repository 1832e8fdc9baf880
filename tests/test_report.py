"""tieify.report: per-layer rows, totals, attention groups and every renderer, on hand-built
tied models with hand-computed counts."""

from __future__ import annotations

import copy
import csv
import io
import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from tieify import Report, report
from tieify.nn import TiedConv2d, TiedLinear

# -- a tiny net and its tied form, built by hand -------------------------------------------


class SE(nn.Module):
    def __init__(self, c: int, r: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)  # 432 params
        self.bn = nn.BatchNorm2d(16)  # 32 params
        self.conv = nn.Conv2d(16, 32, 3, padding=1, bias=False)  # 4,608
        self.gconv = nn.Conv2d(32, 32, 3, padding=1, groups=2, bias=False)  # 4,608
        self.pw = nn.Conv2d(32, 32, 1, bias=False)  # 1,024
        self.se = SE(32, 4)  # fc1: 32·8 + 8 = 264, fc2: 8·32 + 32 = 288
        self.fc = nn.Linear(32, 10)  # 330

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gconv(self.conv(self.bn(self.stem(x))))
        x = self.se(self.pw(x))
        return self.fc(x.mean((2, 3)))


def _tied(net: Net) -> Net:
    t = copy.deepcopy(net)
    t.conv = TiedConv2d.from_dense(net.conv, B=4)  # 4,608/16 = 288
    t.gconv = TiedConv2d.from_dense(net.gconv, B=2)  # TGC: 4,608/4 = 1,152
    t.pw = nn.Conv2d(32, 32, 1, groups=4, bias=False)  # grouped: 1,024/4 = 256
    t.se.fc1 = TiedConv2d.from_dense(net.se.fc1, B=2)  # 16·4 + 4 = 68
    t.se.fc2 = TiedConv2d.from_dense(net.se.fc2, B=2)  # 4·16 + 16 = 80
    t.fc = TiedLinear.from_dense(net.fc, B=2)  # 16·5 + 5 = 85
    return t


H = W = 8
X = torch.randn(2, 3, H, W)  # batch 2: MACs double
P = 2 * H * W  # output positions of every full-resolution conv, whole batch

EXPECTED = {
    # name: (action, B, groups, params before, after, MACs before, after)
    "stem": ("leave", None, 1, 432, 432, P * 432, P * 432),
    "conv": ("tie", 4, 1, 4_608, 288, P * 4_608, P * 4_608 // 4),
    "gconv": ("tie", 2, 2, 4_608, 1_152, P * 4_608, P * 4_608 // 2),
    "pw": ("group", None, 4, 1_024, 256, P * 1_024, P * 1_024 // 4),
    "se.fc1": ("tie", 2, 1, 264, 68, 2 * 256, 2 * 256 // 2),
    "se.fc2": ("tie", 2, 1, 288, 80, 2 * 256, 2 * 256 // 2),
    "fc": ("tie", 2, None, 330, 85, 2 * 320, 2 * 320 // 2),
}


@pytest.fixture(scope="module")
def models() -> tuple[Net, Net]:
    torch.manual_seed(0)
    net = Net()
    return net, _tied(net)


@pytest.fixture(scope="module")
def rep(models: tuple[Net, Net]) -> Report:
    net, tied = models
    return report(net, tied, X, title="tiny")


def test_rows_by_module_diff_hand_counted(rep: Report) -> None:
    assert not rep.from_plan
    rows = {r.name: r for r in rep.rows}
    assert list(rows) == list(EXPECTED)
    for name, (action, B, groups, pb, pa, mb, ma) in EXPECTED.items():
        r = rows[name]
        got = (r.action, r.B, r.groups, r.params_before, r.params_after, r.macs_before)
        assert got == (action, B, groups, pb, pa, mb), name
        assert r.macs_after == ma, name
    assert rows["stem"].reason == "unchanged"
    assert rows["gconv"].kind == "grouped_conv" and rows["gconv"].b_g == "B=2 G=2"
    assert rows["pw"].b_g == "G=4" and rows["conv"].b_g == "B=4" and rows["stem"].b_g == "-"
    assert rows["fc"].kind == "linear" and rows["fc"].channels == "32→10"
    assert rows["conv"].module_after == "TiedConv2d"


def test_totals_and_savings(rep: Report) -> None:
    t = rep.totals()
    before = sum(v[3] for v in EXPECTED.values()) + 32  # + BatchNorm
    after = sum(v[4] for v in EXPECTED.values()) + 32
    assert (t["params_before"], t["params_after"]) == (before, after)
    assert t["params_saved_pct"] == round(100 * (before - after) / before, 2)
    assert t["other"]["params_before"] == t["other"]["params_after"] == 32
    listed_macs = sum(v[5] for v in EXPECTED.values())
    assert t["macs_before"] == listed_macs + t["other"]["macs_before"]
    assert t["other"]["macs_before"] > 0  # batch-norm and pooling, which fvcore counts
    assert t["flops_before"] == 2 * t["macs_before"]
    assert (t["layers"], t["layers_changed"], t["layers_left"]) == (7, 6, 1)
    assert t["attention"] == {}  # no plan: attention branches are not recognised


@dataclass(frozen=True)
class FakeLayerPlan:
    """The fields of tieify.LayerPlan that the report reads."""

    name: str
    kind: str
    action: str
    B: int | None
    groups: int | None
    in_channels: int
    out_channels: int
    attention: str | None = None
    reason: str = ""


@dataclass(frozen=True)
class FakePlan:
    layers: tuple[FakeLayerPlan, ...]


def _plan() -> FakePlan:
    return FakePlan(
        (
            FakeLayerPlan("stem", "conv", "leave", None, 1, 3, 16, reason="stem: 3 input channels"),
            FakeLayerPlan("conv", "conv", "tie", 4, 1, 16, 32),
            FakeLayerPlan("se.fc1", "conv", "tie", 2, 1, 32, 8, attention="SE"),
            FakeLayerPlan("se.fc2", "conv", "tie", 2, 1, 8, 32, attention="SE"),
        )
    )


def test_rows_from_plan_and_attention_groups(models: tuple[Net, Net]) -> None:
    net, tied = models
    rep = report(net, tied, X, plan=_plan())
    assert rep.from_plan
    assert [r.name for r in rep.rows] == ["stem", "conv", "se.fc1", "se.fc2"]
    stem, conv, fc1, _ = rep.rows
    assert stem.reason == "stem: 3 input channels" and stem.action == "leave"
    assert (conv.params_after, conv.macs_after) == (288, P * 4_608 // 4)
    assert fc1.display_kind == "SE conv" and fc1.attention == "SE"
    se = rep.totals()["attention"]["SE"]
    assert se == {
        "layers": 2,
        "params_before": 264 + 288,
        "params_after": 68 + 80,
        "params_saved_pct": round(100 * (552 - 148) / 552, 2),
        "macs_before": 1024,
        "macs_after": 512,
        "macs_saved_pct": 50.0,
    }
    text = rep.to_text()
    assert "SE branches (2 layers): params" in text and "stem: 3 input channels" in text


def test_plan_attribute_on_tied_model_is_used(models: tuple[Net, Net]) -> None:
    net, tied = models
    with_plan = copy.deepcopy(tied)
    with_plan.tieify_plan = _plan()  # type: ignore[assignment]
    rep = report(net, with_plan, X)
    assert rep.from_plan and len(rep.rows) == 4


def test_json(rep: Report) -> None:
    data = json.loads(rep.to_json())
    assert data["version"] == 1
    t = data["totals"]
    for key in ("params_before", "params_after", "macs_before", "macs_after"):
        assert isinstance(t[key], int)
    assert t["flops_after"] == 2 * t["macs_after"]
    assert "multiply-adds" in data["units"]["macs"] and data["units"]["flops"] == "FLOPs = 2·MACs"
    assert [layer["name"] for layer in data["layers"]] == list(EXPECTED)
    conv = data["layers"][1]
    assert (conv["params_before"], conv["params_after"], conv["macs_saved_pct"]) == (
        4_608,
        288,
        75.0,
    )
    assert data["input_shapes"] == [[2, 3, H, W]]
    assert data["counter"] == {"before": "fvcore", "after": "fvcore"}
    assert "aten::sigmoid" in data["unsupported_ops"]["before"]


def test_csv(rep: Report) -> None:
    rows = list(csv.DictReader(io.StringIO(rep.to_csv())))
    assert [r["name"] for r in rows] == list(EXPECTED)
    conv = rows[1]
    assert (conv["action"], conv["B"], conv["params_after"], conv["macs_after"]) == (
        "tie",
        "4",
        "288",
        str(P * 4_608 // 4),
    )
    assert rows[3]["B"] == ""  # grouped only: no B


def test_markdown_and_text_label_units(rep: Report) -> None:
    md = rep.to_markdown()
    assert md.startswith("### tiny")
    assert "| layer | kind | action | B/G | channels |" in md
    assert f"| conv | conv | tie | B=4 | 16→32 | 4,608 | 288 | {P * 4_608:,} |" in md
    assert "| MACs (multiply-adds) |" in md and "| FLOPs (= 2·MACs) |" in md
    text = str(rep)
    assert "MACs (multiply-adds)" in text and "FLOPs (= 2·MACs)" in text
    assert "Not counted (ops no counter covers): aten::mean, aten::mul, aten::sigmoid." in text
    line = next(x for x in text.splitlines() if x.startswith("gconv"))
    assert "B=2 G=2" in line and "4,608" in line and "1,152" in line


def test_rich_rendering(rep: Report) -> None:
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(rep)
    out = console.export_text()
    assert "se.fc2" in out and "4,608" in out and "MACs (multiply-adds)" in out


def test_models_not_modified(models: tuple[Net, Net]) -> None:
    net, tied = models
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    report(net, tied, X)
    assert net.training and net.bn.training
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_default_example_inputs() -> None:
    dense = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.Conv2d(8, 8, 1, bias=False))
    tied = nn.Sequential(dense[0], TiedConv2d.from_dense(dense[1], B=2))
    rep = report(dense, tied)
    assert rep.before.input_shapes == ((1, 3, 224, 224),)
    assert rep.rows[1].macs_after == 224 * 224 * 64 // 2


def test_bad_arguments(models: tuple[Net, Net]) -> None:
    net, _ = models
    with pytest.raises(TypeError, match="`tied` must be an nn.Module"):
        report(net, "tied", X)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="counter"):
        report(net, net, X, counter="thop")


class _Out:
    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


class _Wrapped(nn.Module):
    """The tied net behind a forward fvcore's jit trace cannot handle."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> _Out:
        return _Out(self.inner(x))


def test_one_side_falls_back_both_recounted(models: tuple[Net, Net]) -> None:
    net, tied = models
    rep = report(net, _Wrapped(tied), X)
    assert rep.before.counter == rep.after.counter == "flop_counter"
    assert any("both were counted with torch.utils.flop_counter" in n for n in rep.notes)
    # flop_counter does not count batch-norm or pooling: totals are conv + linear MACs.
    assert rep.before.macs == sum(v[5] for v in EXPECTED.values())
    assert rep.after.macs == sum(v[6] for v in EXPECTED.values())


def test_with_tieify_resnet18_hand_checked_rows() -> None:
    import torchvision

    import tieify

    model = torchvision.models.resnet18()
    x = torch.randn(1, 3, 64, 64)
    tied = tieify.tieify(model, B=4, example_inputs=x)
    rep = report(model, tied, x)
    assert rep.from_plan
    rows = {r.name: r for r in rep.rows}
    conv2 = rows["layer1.0.conv2"]  # 64·64·9 weights; layer1 runs at 16×16 for a 64×64 input
    assert (conv2.params_before, conv2.params_after) == (36_864, 36_864 // 16)
    assert (conv2.macs_before, conv2.macs_after) == (256 * 36_864, 256 * 36_864 // 4)
    assert rows["conv1"].action == "leave" and "stem" in rows["conv1"].reason
    t = rep.totals()
    assert t["params_before"] == 11_689_512
    assert t["params_after"] == sum(p.numel() for p in tied.parameters())


def test_with_tieify_attention_groups() -> None:
    import torchvision

    import tieify

    model = torchvision.models.mobilenet_v3_small()
    x = torch.randn(1, 3, 64, 64)
    rep = report(model, tieify.tieify(model, B=4, example_inputs=x), x)
    se_rows = [r for r in rep.rows if r.attention == "SE"]
    assert len(se_rows) == 18  # 9 squeeze-excitation blocks, two 1×1 convs each
    fc1 = next(r for r in se_rows if r.name == "features.1.block.1.fc1")  # 16→8, bias
    assert (fc1.params_before, fc1.params_after) == (16 * 8 + 8, 16 * 8 // 16 + 8 // 4)
    se = rep.totals()["attention"]["SE"]
    assert se["layers"] == 18
    assert se["params_before"] == sum(r.params_before or 0 for r in se_rows)
    assert se["params_after"] == sum(r.params_after or 0 for r in se_rows)
    assert "SE branches (18 layers): params" in rep.to_markdown()


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["seresnext26d_32x4d", "gcresnet33ts", "convnext_atto", "xception41", "densenet121"]
)
def test_timm_tied_rows_cost_dense_over_B(name: str) -> None:
    timm = pytest.importorskip("timm")
    import tieify

    model = timm.create_model(name, pretrained=False)
    x = torch.randn(1, 3, 64, 64)
    tied_model = tieify.tieify(model, B=4, example_inputs=x)
    rep = report(model, tied_model, x)
    assert rep.before.counter == rep.after.counter == "fvcore"
    tied = [r for r in rep.rows if r.action == "tie" and r.macs_before]
    assert tied
    for r in tied:
        assert r.B is not None and r.macs_after is not None
        assert r.macs_after * r.B == r.macs_before, r.name
        assert r.params_after is not None and r.params_before is not None
        assert r.params_after < r.params_before, r.name
    for r in rep.rows:
        if r.action == "leave":
            assert r.params_after == r.params_before, r.name
    assert rep.totals()["params_after"] == sum(p.numel() for p in tied_model.parameters())


# -- latency -------------------------------------------------------------------------------


def test_measured_latency_leaves_models_as_they_were(
    models: tuple[Net, Net], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tieify import _report

    monkeypatch.setattr(_report, "MEASURE_SECONDS", 0.05)
    net, tied = copy.deepcopy(models)
    net.train()
    net.bn.eval()  # a frozen norm inside a training model: its own flag must come back
    flags = {n: m.training for n, m in net.named_modules()}
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rep = report(net, tied, X, latency="measured", threads=1)
    assert {n: m.training for n, m in net.named_modules()} == flags
    for k, v in net.state_dict().items():  # no running-statistics update either
        torch.testing.assert_close(v, before[k])
    lat = rep.latency
    assert lat is not None and lat.mode == "measured" and lat.threads == 1
    assert lat.rounds is not None and lat.rounds >= 7
    assert lat.before_ms > 0 and lat.after_ms > 0 and lat.ratio > 0
    assert rep.totals()["latency"]["saved_pct"] == round(100 * (1 - lat.ratio), 2)
    assert json.loads(rep.to_json())["latency"]["rounds"] == lat.rounds
    assert "latency ms (measured)" in str(rep)
    assert f"in {lat.rounds} interleaved rounds (each model's fastest, the median of the " in str(
        rep
    )


def test_predicted_latency_rendered_from_the_predictions(
    models: tuple[Net, Net], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tieify.latency import _predict

    net, tied = models
    seen = []

    def fake_predict(model: nn.Module, example_inputs: torch.Tensor, **kw: object) -> float:
        seen.append((model, example_inputs))
        return 2e-3 if model is net else 5e-4

    monkeypatch.setattr(_predict, "predict_latency", fake_predict)
    rep = report(net, tied, X, latency="predicted")
    assert [m for m, _ in seen] == [net, tied] and all(x is X for _, x in seen)
    assert rep.latency is not None
    assert (rep.latency.before_ms, rep.latency.after_ms) == pytest.approx((2.0, 0.5))
    assert rep.latency.ratio == pytest.approx(0.25) and rep.latency.rounds is None
    assert rep.totals()["latency"]["saved_pct"] == 75.0
    assert "| latency ms (predicted) | 2.000 | 0.500 | 75.0% |" in rep.to_markdown()
    line = next(ln for ln in str(rep).splitlines() if ln.startswith("latency ms"))
    assert line.split()[-3:] == ["2.000", "0.500", "75.0%"]
    assert "predicted by tieify.predict_latency" in rep.to_markdown()
    assert report(net, tied, X).latency is None
    assert report(net, tied, X).totals()["latency"] is None


def test_bad_latency_arguments(models: tuple[Net, Net]) -> None:
    net, tied = models
    with pytest.raises(ValueError, match="latency must be None, 'measured' or 'predicted'"):
        report(net, tied, X, latency="fast")
    with pytest.raises(ValueError, match="threads must be a positive int or None, but got 0"):
        report(net, tied, X, latency="measured", threads=0)
