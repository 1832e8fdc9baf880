"""B / groups specifications: ints, pattern mappings (most specific wins), callables, None."""

from __future__ import annotations

import pytest
import torchvision
from torch import nn

import tieify
from tieify import SpecError
from tieify._spec import Patterns, Spec, nearest


def test_int_applies_everywhere_but_is_not_explicit() -> None:
    m = Spec(4, "B").lookup("layer1.0.conv1", None)
    assert (m.matched, m.value, m.explicit) == (True, 4, False)


def test_most_specific_pattern_wins() -> None:
    s = Spec({"*": 4, "layer4.*": 8, "layer4.0.conv2": 2, "layer4.*.conv?": 16}, "B")
    assert s.lookup("layer4.0.conv2", None).value == 2  # exact name beats every glob
    assert s.lookup("layer4.1.conv1", None).value == 16  # more literal characters
    assert s.lookup("layer4.1.downsample.0", None).value == 8
    assert s.lookup("layer1.0.conv1", None).value == 4
    assert s.lookup("layer1.0.conv1", None).explicit is False  # "*" names nothing
    assert s.lookup("layer4.1.downsample.0", None).explicit is True


def test_ties_between_equally_specific_patterns_go_to_the_first() -> None:
    s = Spec({"layer1*": 2, "*.conv1": 8}, "B")  # both 6 literal characters, one wildcard
    assert s.lookup("layer1.conv1", None).value == 2
    s = Spec({"*.conv1": 8, "layer1*": 2}, "B")
    assert s.lookup("layer1.conv1", None).value == 8


def test_none_value_and_unmatched() -> None:
    s = Spec({"layer4.*": None, "layer*": 4}, "B")
    m = s.lookup("layer4.0.conv1", None)
    assert (m.matched, m.value) == (True, None)
    m = s.lookup("fc", None)
    assert (m.matched, m.value) == (False, None)
    assert Spec(None, "groups").lookup("x", None).matched is False


def test_callable_receives_name_and_module() -> None:
    conv = nn.Conv2d(8, 8, 3)
    seen = []

    def fn(name: str, module: nn.Module) -> int | None:
        seen.append((name, module))
        return 2 if module.kernel_size == (3, 3) else None

    m = Spec(fn, "B").lookup("a.b", conv)
    assert (m.value, m.explicit) == (2, True)
    assert seen == [("a.b", conv)]


@pytest.mark.parametrize(
    "bad",
    [True, 0, -2, 2.0, "4", [4], {}, {"": 4}, {3: 4}, {"*": 0}, {"*": "4"}, {"*": 1.5}],
)
def test_bad_specs_raise_spec_error(bad: object) -> None:
    with pytest.raises(SpecError, match="`B`"):
        Spec(bad, "B")


def test_callable_errors_are_named() -> None:
    with pytest.raises(SpecError, match="callable raised KeyError.*'x'"):
        Spec(lambda n, m: {}[n], "B").lookup("x", None)
    with pytest.raises(SpecError, match="callable's result for 'x'"):
        Spec(lambda n, m: "4", "B").lookup("x", None)


def test_patterns() -> None:
    assert Patterns("layer*", "include").first_match("layer1.conv") == "layer*"
    assert Patterns(["a", "b*"], "exclude").first_match("bc") == "b*"
    assert Patterns(None, "include").first_match("x") is None
    for bad in (3, [3], [""]):
        with pytest.raises(SpecError, match="include"):
            Patterns(bad, "include")  # type: ignore[arg-type]


def test_nearest() -> None:
    assert nearest(4, [1, 2, 3, 6]) == 3
    assert nearest(5, [1, 2, 4, 6]) == 4  # tie -> the smaller
    assert nearest(8, [1]) == 1


def test_mapping_in_a_real_plan() -> None:
    model = torchvision.models.resnet18()
    p = tieify.plan(model, B={"layer4.*": 8, "layer4.0.conv2": 2, "*": 4, "layer1.*": None})
    B = {lp.name: lp.B for lp in p.layers}
    assert B["layer4.0.conv2"] == 2
    assert B["layer4.1.conv1"] == 8
    assert B["layer3.0.conv1"] == 4
    assert B["layer1.0.conv1"] == 1
    assert "B is None (pattern 'layer1.*')" in p.layer("layer1.0.conv1").reason
    assert B["fc"] == 1 and "classifier" in p.layer("fc").reason  # "*" does not name fc
    p = tieify.plan(model, B={"fc": 4, "*": 4})
    assert p.layer("fc").action == "tie"  # named explicitly
