"""Argument checks: errors that name the argument and what it accepts."""

import math

import keras
import numpy as np
import pytest

from keras_muon.arguments import boolean
from keras_muon.arguments import layer_rule
from keras_muon.arguments import number


def test_number_returns_python_floats_within_bounds():
    assert number("beta", np.float32(0.5), minimum=0.0, below=1.0) == 0.5
    assert type(number("steps", np.int64(3), minimum=1)) is float
    assert number("threshold", None, above=0.0, optional=True) is None


@pytest.mark.parametrize(
    "value, bounds, expected",
    [
        (1.0, {"below": 1.0}, "< 1.0"),
        (0.0, {"above": 0.0}, "> 0.0"),
        (-1.0, {"minimum": 0.0}, ">= 0.0"),
        (2.0, {"maximum": 1.0}, "<= 1.0"),
        (math.nan, {}, "finite"),
        (True, {}, "finite number"),
        ("0.1", {}, "finite number"),
        (None, {}, "finite number"),
    ],
)
def test_number_errors_name_the_argument_and_the_bounds(value, bounds, expected):
    with pytest.raises(ValueError, match=f"`rate` must be a .*{expected}.*Received: rate="):
        number("rate", value, **bounds)


def test_boolean():
    assert boolean("flag", False) is False
    with pytest.raises(ValueError, match="`flag` must be True or False. Received: flag=1"):
        boolean("flag", 1)


def test_layer_rule():
    layer_rule(keras.layers.Dense, lambda layer: None)
    with pytest.raises(ValueError, match="layer_type"):
        layer_rule(keras.layers.Dense(2), lambda layer: None)
    with pytest.raises(ValueError, match="rule"):
        layer_rule(keras.layers.Dense, "rule")
