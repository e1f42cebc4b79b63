"""The routing table, its summary, and the table formatter."""

import re
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_muon
from keras_muon import report
from keras_muon.report import format_table
from tests.helpers import table_for
from tests.routing.test_route import MISLEADING_NAMES
from tests.routing.test_route import misleadingly_named_model

README = Path(__file__).resolve().parents[1] / "README.md"


def test_routing_table_rows():
    table = table_for(misleadingly_named_model())
    row = table["embedding_mixer/kernel"]
    assert row == {
        "path": "embedding_mixer/kernel",
        "shape": (16, 32),
        "route": "muon",
        "reason": "Dense kernel",
        "matrix_shape": (16, 32),
        "num_blocks": 1,
        "scale": pytest.approx(0.2 * np.sqrt(32)),
        "parts": (),
    }


def test_summary_prints_every_variable():
    model = misleadingly_named_model()
    optimizer = keras_muon.Muon()
    model.compile(optimizer=optimizer, loss="mse")
    optimizer.build(model.trainable_variables)
    printed = []
    optimizer.summary(print_fn=printed.append)
    text = printed[0]
    for path in MISLEADING_NAMES:
        assert path in text
    assert "16×32" in text
    assert "muon: 1 variables, 512 parameters" in text


def test_routing_table_needs_a_built_optimizer():
    with pytest.raises(ValueError, match="not built"):
        keras_muon.Muon().routing_table()


def test_format_table_pads_columns_to_their_widest_cell():
    lines = format_table([("a", "bb", "c"), ("ccc", "d", "")])
    assert lines == ["a    bb  c", "ccc  d"]


def test_the_readme_shows_what_summary_prints():
    # The model of the README's "What goes where", and the text it shows.
    tokens = keras.Input((32,), dtype="int32")
    x = keras.layers.Embedding(1000, 64, name="tok")(tokens)
    x = keras.layers.MultiHeadAttention(4, 16, name="attention")(x, x)
    x = keras.layers.Conv1D(64, 3, padding="causal", groups=4, name="conv")(x)
    x = keras.layers.LSTM(32, name="lstm")(x)
    x = keras.layers.Dense(64, activation="relu", name="embedding_mixer")(x)
    x = keras.layers.Dense(10, name="proj")(x)
    outputs = keras.layers.Activation("softmax")(x)
    model = keras.Model(tokens, outputs)
    optimizer = keras_muon.Muon(per_head=True, name="muon")
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    optimizer.build(model.trainable_variables)
    printed = []
    optimizer.summary(print_fn=printed.append)
    shown = re.search(r"```\n(Optimizer \"muon\" routing\n.*?)\n```", README.read_text(), re.S)
    assert shown is not None
    assert printed[0] == shown.group(1)


def test_a_fused_kernel_is_shown_as_its_parts():
    row = {
        "route": "muon",
        "path": "block/linear1/kernel",
        "shape": (8, 36),
        "reason": "Dense kernel, fused [q|k|v|mlp_in] per head",
        "matrix_shape": (8, 12),
        "num_blocks": 7,
        "scale": (0.2 * np.sqrt(8), 0.2 * np.sqrt(12)),
        "parts": (("q", (8, 4), 2), ("k", (8, 4), 2), ("v", (8, 4), 2), ("mlp_in", (8, 12), 1)),
    }
    text = report.routing_summary("muon", [row])
    assert "q|k|v 8×4 ×6, mlp_in 8×12  0.566, 0.693  Dense kernel" in text
