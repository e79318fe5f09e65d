"""blurpool_algo.checks: each helper accepts exactly its kind, returns it, and refuses everything else in one style."""

from __future__ import annotations

import math
import re

import pytest

from blurpool_algo.checks import CheckError, check_bool, check_choice, check_float, check_int, check_int_or_pair, fail

#: The one message style: "<name> must be <allowed>[ (<hint>)], got <value!r>".
STYLE = re.compile(r"^(?P<name>\S+) must be (?P<allowed>.+?)(?: \((?P<hint>[^()]*)\))?, got (?P<got>.+)$")


def _message(error: pytest.ExceptionInfo) -> re.Match:
    match = STYLE.match(str(error.value))
    assert match is not None, str(error.value)
    return match


@pytest.mark.parametrize("value", [0, 1, 7, 10**12, -3])
def test_check_int_accepts_ints_in_range_and_returns_them(value):
    assert check_int("n", value) is value
    if value >= 1:
        assert check_int("n", value, minimum=1) is value


@pytest.mark.parametrize("value", [True, False, 1.0, "1", None, [1], float("nan")])
def test_check_int_refuses_what_is_not_an_int(value):
    with pytest.raises(ValueError) as error:
        check_int("window_size", value, minimum=1)
    match = _message(error)
    assert (match["name"], match["allowed"], match["got"]) == ("window_size", "an int >= 1", repr(value))


@pytest.mark.parametrize(("value", "allowed"), [(0, "an int >= 1 and <= 32"), (33, "an int >= 1 and <= 32")])
def test_check_int_bounds_are_inclusive_and_named(value, allowed):
    assert check_int("filter_size", 1, minimum=1, maximum=32) == 1
    assert check_int("filter_size", 32, minimum=1, maximum=32) == 32
    with pytest.raises(ValueError) as error:
        check_int("filter_size", value, minimum=1, maximum=32, hint="1 = no blur")
    match = _message(error)
    assert (match["allowed"], match["hint"]) == (allowed, "1 = no blur")


def test_check_int_none_only_when_allowed():
    assert check_int("crop_size", None, minimum=1, allow_none=True) is None
    with pytest.raises(ValueError) as error:
        check_int("crop_size", None, minimum=1)
    assert _message(error)["allowed"] == "an int >= 1"
    with pytest.raises(ValueError) as error:
        check_int("crop_size", 0, minimum=1, allow_none=True)
    assert _message(error)["allowed"] == "an int >= 1 or None"


@pytest.mark.parametrize(("value", "pair"), [(2, (2, 2)), ((1, 3), (1, 3)), ([2, 1], (2, 1))])
def test_check_int_or_pair_returns_a_pair(value, pair):
    assert check_int_or_pair("stride", value, minimum=1) == pair


@pytest.mark.parametrize("value", [0, (1, 0), (1, 2, 3), (True, 1), "22", (1.0, 1), None])
def test_check_int_or_pair_refuses(value):
    with pytest.raises(ValueError) as error:
        check_int_or_pair("stride", value, minimum=1)
    assert _message(error)["allowed"] == "an int >= 1 or a pair of them"


@pytest.mark.parametrize(("value", "minimum", "inclusive", "ok"), [
    (0.0, 0.0, True, True), (0.0, 0.0, False, False), (1e-9, 0.0, False, True), (3, None, True, True),
    (math.inf, None, True, False), (math.nan, 0.0, True, False), (-1.0, 0.0, True, False), (True, None, True, False),
    ("0.1", None, True, False),
])  # fmt: skip
def test_check_float(value, minimum, inclusive, ok):
    if ok:
        assert check_float("lr", value, minimum=minimum, inclusive=inclusive) == float(value)
        return
    with pytest.raises(ValueError) as error:
        check_float("lr", value, minimum=minimum, inclusive=inclusive)
    allowed = _message(error)["allowed"]
    assert allowed.startswith("a finite number")
    if minimum is not None:
        assert allowed.endswith(f"{'>=' if inclusive else '>'} {minimum:g}")


@pytest.mark.parametrize("value", [0, 1, "true", None])
def test_check_bool_refuses_look_alikes(value):
    assert check_bool("blur_first", True) is True and check_bool("blur_first", False) is False
    with pytest.raises(ValueError) as error:
        check_bool("blur_first", value)
    assert _message(error)["allowed"] == "True or False"


@pytest.mark.parametrize("value", ["CROP", "", None, 1, ["crop"], {"crop": 1}])
def test_check_choice_refuses_other_values_even_unhashable_ones(value):
    assert check_choice("mode", "crop", ("crop", "circular")) == "crop"
    with pytest.raises(ValueError) as error:
        check_choice("mode", value, ("crop", "circular"))
    assert _message(error)["allowed"] == "one of 'crop', 'circular'"


def test_check_choice_does_not_confuse_equal_values_of_other_types():
    # 1 == True and 0 == False in Python: a choice among ints must still refuse a bool.
    with pytest.raises(ValueError):
        check_choice("world", True, (1, 2))


def test_fail_is_the_style_itself():
    assert str(fail("x", "an int", 2.5, "a count")) == "x must be an int (a count), got 2.5"


def test_the_error_keeps_name_and_requirement_apart_for_callers_that_name_the_argument_otherwise():
    import pickle

    with pytest.raises(CheckError) as error:
        check_int("train_batch_size", 0, minimum=1)
    assert (error.value.name, error.value.requirement) == ("train_batch_size", "must be an int >= 1, got 0")
    assert isinstance(error.value, ValueError)
    copy = pickle.loads(pickle.dumps(error.value))
    assert (type(copy), str(copy), copy.requirement) == (CheckError, str(error.value), error.value.requirement)
