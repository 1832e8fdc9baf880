"""``tieify report``: formats, specs, model strings, and one-line errors with exit code 2."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tieify import SpecError
from tieify.cli import main
from tieify.cli._report import parse_input_size, parse_spec

# resnet18 at 3×64×64: layer1 runs at 16×16, so layer1.0.conv2 (64·64·9 = 36,864 weights)
# costs 16·16·36,864 = 9,437,184 MACs dense; tied with B=4: 2,304 weights, 2,359,296 MACs.
SMALL = ["--input-size", "3,64,64"]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- SPEC and input-size parsing -------------------------------------------------------------


def test_parse_spec_forms(tmp_path: Path) -> None:
    assert parse_spec(None) is None
    assert parse_spec(" 8 ") == 8
    assert parse_spec("layer4.*=8, *=4") == {"layer4.*": 8, "*": 4}
    assert parse_spec("fc=none,*=2") == {"fc": None, "*": 2}
    yml = tmp_path / "b.yaml"
    yml.write_text("layer4.*: 8\n'*': 4\nfc: null\n")
    assert parse_spec(str(yml)) == {"layer4.*": 8, "*": 4, "fc": None}
    js = tmp_path / "b.json"
    js.write_text('{"layer3.*": 2}')
    assert parse_spec(str(js), "--groups") == {"layer3.*": 2}
    plain = tmp_path / "b4.yml"
    plain.write_text("4\n")
    assert parse_spec(str(plain)) == 4


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "must not be empty"),
        ("four", r"positive int or 'none', but got 'four'"),
        ("0", "positive int"),
        ("-2", "positive int"),
        ("none", "leaves every layer"),
        ("layer4.*=8,4", r"'pattern=value', but got '4'"),
        ("=4", r"'pattern=value', but got '=4'"),
        ("a=1,a=2", "given twice"),
        ("layer4.*=x", r"the value of 'layer4.\*'"),
        ("missing.yaml", "does not exist"),
    ],
)
def test_parse_spec_errors(text: str, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        parse_spec(text, "--B")


def test_parse_spec_file_errors(tmp_path: Path) -> None:
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{layer4: 8")
    with pytest.raises(SpecError, match="not valid JSON"):
        parse_spec(str(bad_json))
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("a: [1, 2\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        parse_spec(str(bad_yaml))
    bad_value = tmp_path / "v.yaml"
    bad_value.write_text("layer4: 2.5\n")
    with pytest.raises(SpecError, match="the value of 'layer4'"):
        parse_spec(str(bad_value))


def test_parse_input_size() -> None:
    assert parse_input_size("3,224,224") == (3, 224, 224)
    assert parse_input_size("3x32x32") == (3, 32, 32)
    assert parse_input_size("3, 16, 112, 112") == (3, 16, 112, 112)
    for bad in ("224", "3,a,4", "3,0,4", "1,2,3,4,5", ""):
        with pytest.raises(SpecError, match="--input-size must be"):
            parse_input_size(bad)


# -- errors: one line, exit code 2 -------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["resnet5o", "--B", "4"], "unknown model 'resnet5o'.*Did you mean resnet50"),
        (["timm:resnet5o", "--B", "4"], "timm has no model 'resnet5o'"),
        (["nope.models:make", "--B", "4"], "cannot import module 'nope.models'"),
        (["resnet18", "--B", "4,x"], "--B: SPEC must be a positive int"),
        (["resnet18", "--groups", "layer1.*=two"], "--groups: the value of 'layer1.*'"),
        (["resnet18", "--B", "4", "--input-size", "3,a,4"], "--input-size must be"),
        (["resnet18", "--B", "4", "--input-size", "2,32,32"], "--input-size 2,32,32 does not fit"),
        (["resnet18", "--B", "4", "--batch", "0"], "--batch must be a positive int"),
        (["resnet18"], "nothing to tie: give --B SPEC"),
    ],
)
def test_errors_are_one_line_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], match: str
) -> None:
    import re

    code, out, err = _run(capsys, "report", *argv)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tieify report: error: ")
    assert re.search(match, lines[0]), lines[0]
    assert "Traceback" not in err


# -- reports -----------------------------------------------------------------------------------


def test_json_report_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "report", "resnet18", "--B", "4", *SMALL, "--format", "json")
    assert code == 0, err
    data = json.loads(out)
    rows = {r["name"]: r for r in data["layers"]}
    conv2 = rows["layer1.0.conv2"]
    assert (conv2["action"], conv2["B"], conv2["in_channels"], conv2["out_channels"]) == (
        "tie",
        4,
        64,
        64,
    )
    assert (conv2["params_before"], conv2["params_after"]) == (36_864, 2_304)
    assert (conv2["macs_before"], conv2["macs_after"]) == (9_437_184, 9_437_184 // 4)
    assert rows["conv1"]["action"] == "leave" and rows["conv1"]["reason"]
    t = data["totals"]
    assert t["params_before"] == 11_689_512  # resnet18
    assert t["params_after"] < t["params_before"] and t["macs_after"] < t["macs_before"]
    assert t["flops_before"] == 2 * t["macs_before"]
    assert data["input_shapes"] == [[1, 3, 64, 64]]


def test_pattern_spec_most_specific_wins(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(
        capsys, "report", "resnet18", "--B", "layer4.*=8,*=4", *SMALL, "--format", "csv"
    )
    assert code == 0, err
    rows = {r["name"]: r for r in csv.DictReader(io.StringIO(out))}
    assert rows["layer4.1.conv2"]["B"] == "8"
    assert rows["layer4.1.conv2"]["params_after"] == str(512 * 512 * 9 // 64)
    assert rows["layer2.1.conv2"]["B"] == "4"


def test_table_and_markdown_to_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "report", "resnet18", "--B", "4", *SMALL)
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.startswith("layer1.0.conv2 "))
    assert "B=4" in line and "36,864" in line and "2,304" in line and "9,437,184" in line
    assert "MACs (multiply-adds)" in out and "FLOPs (= 2·MACs)" in out
    target = tmp_path / "rep.md"
    code, out, err = _run(
        capsys, "report", "resnet18", "--B", "4", *SMALL, "--format", "markdown", "-o", str(target)
    )
    assert code == 0 and out == ""
    assert f"wrote {target}" in err
    md = target.read_text()
    assert "| layer1.0.conv2 | conv | tie | B=4 | 64→64 | 36,864 | 2,304 |" in md


def test_file_factory_with_groups(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    net = tmp_path / "net.py"
    net.write_text(
        textwrap.dedent(
            """
            import torch.nn as nn

            def make():
                return nn.Sequential(
                    nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                    nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
                )
            """
        )
    )
    code, out, err = _run(
        capsys,
        *("report", f"{net}:make", "--groups", "2", "--input-size", "3,8,8", "--format", "json"),
    )
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)["layers"]}
    assert rows["2"]["action"] == "group" and rows["2"]["groups"] == 2
    assert (rows["2"]["params_before"], rows["2"]["params_after"]) == (16 * 32 * 9 + 32, 2336)
    assert rows["2"]["macs_after"] == 64 * 16 * 32 * 9 // 2
    assert rows["0"]["action"] == "leave"  # the stem reads the image


def test_console_script(tmp_path: Path) -> None:
    exe = shutil.which("tieify", path=os.path.dirname(sys.executable)) or shutil.which("tieify")
    assert exe is not None, "the tieify console script is not installed"
    ok = subprocess.run(
        [exe, "report", "resnet18", "--B", "4", "--input-size", "3,32,32", "--format", "csv"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert "layer1.0.conv2,conv,,tie,4," in ok.stdout
    bad = subprocess.run(
        [exe, "report", "resnet5o", "--B", "4"], capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_table_on_a_terminal_uses_rich(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code, out, err = _run(capsys, "report", "resnet18", "--B", "4", "--input-size", "3,32,32")
    assert code == 0, err
    out = re.sub(r"\x1b\[[0-9;]*m", "", out)  # colours off
    assert "┃ layer" in out  # rich's table border
    line = next(x for x in out.splitlines() if "layer1.0.conv2" in x)
    assert "36,864" in line and "2,304" in line


def test_preset_root_8(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(
        capsys, "report", "resnet18", "--preset", "root-8", *SMALL, "--format", "json"
    )
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)["layers"]}
    # Deep Roots root-8: groups 8/4/2/1 over the stages' 3×3 convs (DESIGN §2).
    conv = rows["layer1.0.conv2"]
    assert (conv["action"], conv["groups"], conv["B"]) == ("group", 8, None)
    assert (conv["params_after"], conv["macs_after"]) == (36_864 // 8, 9_437_184 // 8)
    assert rows["layer3.1.conv2"]["groups"] == 2
    assert rows["layer4.1.conv2"]["action"] == "leave"


def test_unknown_preset_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "report", "resnet18", "--preset", "root-9", *SMALL)
    assert code == 2 and out == ""
    assert err.startswith("tieify report: error: --preset: unknown preset 'root-9'; known")
    assert err.count("\n") == 1


def test_latency_measured_json(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tieify import _report

    monkeypatch.setattr(_report, "MEASURE_SECONDS", 0.05)
    argv = ("resnet18", "--B", "4", *SMALL, "--latency", "measured", "--threads", "1")
    code, out, err = _run(
        capsys, "report", *argv, "--channels-last", "--optimize", "--format", "json"
    )
    assert code == 0, err
    data = json.loads(out)
    lat = data["latency"]
    assert lat["mode"] == "measured" and lat["threads"] == 1 and lat["rounds"] >= 7
    assert data["totals"]["latency"]["ratio"] == lat["ratio"] > 0
    assert "channels-last" in data["title"]


def test_optimize_runs_on_both_models(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--optimize runs tieify.optimize on the original too (on an NCHW input it may make
    that model's inputs channels-last at its entry), then on the tied model, each once."""
    import tieify.latency
    from tieify import _report
    from tieify.nn import TiedConv2d

    monkeypatch.setattr(_report, "MEASURE_SECONDS", 0.05)
    seen: list[bool] = []
    real = tieify.latency.optimize

    def spy(m, x, **kw):
        seen.append(any(isinstance(c, TiedConv2d) for c in m.modules()))
        return real(m, x, **kw)

    monkeypatch.setattr(tieify.latency, "optimize", spy)
    argv = ("resnet18", "--B", "4", *SMALL, "--latency", "measured", "--threads", "1")
    code, out, err = _run(capsys, "report", *argv, "--optimize", "--format", "json")
    assert code == 0, err
    assert seen == [False, True]
    assert json.loads(out)["latency"]["ratio"] > 0


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--threads", "2"], r"--threads only changes how latency is timed; add --latency"),
        (["--channels-last", "--optimize"], r"--channels-last, --optimize only change how"),
        (["--latency", "measured", "--threads", "0"], "--threads must be a positive int"),
    ],
)
def test_latency_flag_errors(
    capsys: pytest.CaptureFixture[str], flags: list[str], match: str
) -> None:
    import re

    code, out, err = _run(capsys, "report", "resnet18", "--B", "4", *SMALL, *flags)
    assert code == 2 and out == ""
    assert re.search(match, err.strip()), err
