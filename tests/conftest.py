"""Fixtures shared by the tests."""

import keras
import pytest

from keras_muon.routing.fused import FUSED_PROJECTIONS
from keras_muon.routing.keras_layers import MATRIX_RULES


@pytest.fixture
def dtype_policy():
    """Sets Keras's dtype policy for one test."""
    yield keras.config.set_dtype_policy
    keras.config.set_dtype_policy("float32")


@pytest.fixture
def isolated_rules():
    """Undoes the routing rules and fused projections a test registers."""
    with MATRIX_RULES.scoped(), FUSED_PROJECTIONS.scoped():
        yield
