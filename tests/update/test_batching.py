"""One Newton–Schulz batch per block shape, and back to the variables."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_muon
from keras_muon.backends import distributed
from keras_muon.routing.views import PartsView
from keras_muon.update import batching
from keras_muon.update.state import Entry
from keras_muon.update.state import VariableState


def feed_forward_and_attention_model():
    """Muon blocks of two shapes: 16×64 (two up, two transposed down
    projections) and 16×16 (the four attention projections)."""
    inputs = keras.Input((6, 16))
    x = keras.layers.Dense(64, name="up1")(inputs)
    x = keras.layers.Dense(16, name="down1")(x)
    x = keras.layers.MultiHeadAttention(2, 8, name="mha")(x, x)
    x = keras.layers.Dense(64, name="up2")(x)
    x = keras.layers.Dense(16, name="down2")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x))


def train_two_steps(model, weights, optimizer):
    model.set_weights(weights)
    optimizer.attach(model)
    rng = np.random.default_rng(40)
    for _ in range(2):
        grads = [rng.normal(size=v.shape).astype("float32") for v in model.trainable_variables]
        optimizer.apply([ops.convert_to_tensor(g) for g in grads], model.trainable_variables)
    return [ops.convert_to_numpy(v) for v in model.trainable_variables]


def recorded_batches(monkeypatch):
    """The shapes of the Newton–Schulz batches run from now on."""
    batches = []
    newton_schulz = distributed.newton_schulz

    def recording_newton_schulz(x, *args):
        batches.append(tuple(x.shape))
        return newton_schulz(x, *args)

    monkeypatch.setattr(distributed, "newton_schulz", recording_newton_schulz)
    return batches


def test_one_newton_schulz_batch_per_block_shape(monkeypatch):
    batches = recorded_batches(monkeypatch)
    keras.utils.set_random_seed(41)
    model = feed_forward_and_attention_model()
    train_two_steps(model, model.get_weights(), keras_muon.Muon())
    assert sorted(batches) == [(4, 16, 16), (4, 16, 16), (4, 16, 64), (4, 16, 64)]


def test_batched_update_equals_one_variable_at_a_time(monkeypatch):
    keras.utils.set_random_seed(42)
    model = feed_forward_and_attention_model()
    weights = model.get_weights()
    batched = train_two_steps(model, weights, keras_muon.Muon(weight_decay=0.1))

    # The path of tf.distribute strategies other than MirroredStrategy:
    # `update_step` for each variable.
    def one_variable_at_a_time(optimizer, grads, variables, learning_rate):
        for gradient, variable in zip(grads, variables):
            optimizer.update_step(gradient, variable, learning_rate)

    monkeypatch.setattr(keras_muon.Muon, "_backend_update_step", one_variable_at_a_time)
    one_at_a_time = train_two_steps(model, weights, keras_muon.Muon(weight_decay=0.1))
    for a, b, v in zip(batched, one_at_a_time, model.trainable_variables):
        np.testing.assert_allclose(a, b, atol=1e-6, err_msg=v.path)


def entry(shape, name):
    """An `Entry` of a 2-D variable, or of a 3-D one read per leading index."""
    if len(shape) == 3:
        view = keras_muon.MatrixView.from_axes(shape, inputs=(1,), outputs=(2,), blocks=(0,))
    else:
        view = keras_muon.MatrixView.dense(shape)
    state = VariableState(keras_muon.Route(view, name))
    return Entry(name, None, state)


def sections_entry(name):
    """A (4, 10) variable read as a (4, 6) part and a (4, 4) one."""
    parts = [keras_muon.MatrixView.dense((4, 6)), keras_muon.MatrixView.dense((4, 4))]
    view = PartsView.of((4, 10), 1, parts)
    return Entry(name, None, VariableState(keras_muon.Route(view, name)))


def test_stack_by_shape_and_by_variable_round_trip():
    entries = [
        entry((4, 6), "wide"),
        entry((6, 4), "tall"),
        entry((3, 4, 4), "heads"),
        sections_entry("parts"),
        entry((4, 4), "square"),
        entry((2, 4, 6), "experts"),
        entry((2, 6, 4), "experts transposed"),
    ]
    rng = np.random.default_rng(0)
    values = [rng.normal(size=e.state.route.view.shape).astype("float32") for e in entries]
    wide = [
        e.state.route.view.to_wide_blocks(ops.convert_to_tensor(v)) for e, v in zip(entries, values)
    ]
    placed = ("model", None, None)  # two expert banks, each expert on a device
    batches = batching.stack_by_shape(entries, wide, [None] * 5 + [placed] * 2)
    # The tall block joins the wide one's batch, in order of appearance;
    # each part of a variable joins the batch of its shape; banks laid out
    # by block share one batch of their own.
    assert [[e.variable for e in b.entries] for b in batches] == [
        ["wide", "tall", "parts"],
        ["heads", "parts", "square"],
        ["experts", "experts transposed"],
    ]
    assert [b.parts for b in batches] == [[0, 0, 0], [0, 1, 0], None]
    assert [tuple(b.blocks.shape) for b in batches] == [(3, 4, 6), (5, 4, 4), (4, 4, 6)]
    # Their blocks in turn, expert by expert: each device keeps its own.
    np.testing.assert_array_equal(
        ops.convert_to_numpy(batches[2].blocks),
        np.stack([values[5][0], values[6][0].T, values[5][1], values[6][1].T]),
    )
    got = list(batching.by_variable(batches, [b.blocks for b in batches]))
    # A variable of several parts comes once its last part has.
    assert [e.variable for e, _ in got] == [
        "wide",
        "tall",
        "heads",
        "parts",
        "square",
        "experts",
        "experts transposed",
    ]
    for e, blocks in got:
        view = e.state.route.view
        assert [tuple(b.shape) for b in blocks] == [
            (p.num_blocks, p.d_in, p.d_out) for p in view.parts
        ]
        joined = view.from_blocks(blocks if len(blocks) > 1 else blocks[0])
        np.testing.assert_array_equal(
            ops.convert_to_numpy(joined), values[[x.variable for x in entries].index(e.variable)]
        )


def test_buckets_hold_at_most_the_budget_per_device():
    entries = [
        entry((4, 8), "a"),
        entry((8, 4), "b transposed"),
        entry((3, 4, 8), "heads"),
        entry((4, 4), "square"),
        entry((4, 8), "c"),
    ]
    placed = [entry((2, 4, 8), "placed"), entry((2, 4, 8), "placed too")]
    placements = [None] * 5 + [("model", None, None)] * 2
    block = 4 * 4 * 8  # float32 bytes of a 4×8 block
    names = [
        [e.variable for e in bucket]
        for bucket in batching.buckets([*entries, *placed], placements, 2 * block, [1] * 7)
    ]
    # Two 4×8 blocks a bucket; the three heads exceed it, so they go alone;
    # entries laid out whole over the devices are bucketed apart.
    assert names == [
        ["a", "b transposed"],
        ["heads"],
        ["c"],
        ["square"],
        ["placed"],
        ["placed too"],
    ]
    # Variables split over two devices: each holds half their blocks.
    names = [
        [e.variable for e in b] for b in batching.buckets(entries, [None] * 5, 2 * block, [2] * 5)
    ]
    assert names == [["a", "b transposed"], ["heads", "c"], ["square"]]
    # The default budget holds a small model's blocks at once: one bucket.
    default = batching.buckets([*entries, *placed], placements, None, [1] * 7)
    assert [[e.variable for e in b] for b in default] == [[e.variable for e in entries + placed]]


def test_bucketed_update_equals_one_shot(monkeypatch):
    keras.utils.set_random_seed(43)
    model = feed_forward_and_attention_model()
    weights = model.get_weights()
    batches = recorded_batches(monkeypatch)
    one_shot = train_two_steps(model, weights, keras_muon.NorMuon(per_head=True))
    assert len(batches) == 2 * 2  # a batch per block shape per step
    del batches[:]
    # One 16×64 block a bucket: two up projections, two down, each alone.
    optimizer = keras_muon.NorMuon(per_head=True, ns_bucket_bytes=4 * 16 * 64)
    bucketed = train_two_steps(model, weights, optimizer)
    assert sorted(set(batches)) == [(1, 16, 64), (8, 8, 16)]
    assert len(batches) == 2 * 5
    for a, b, v in zip(one_shot, bucketed, model.trainable_variables):
        np.testing.assert_allclose(a, b, atol=1e-6, err_msg=v.path)


def test_a_bucket_smaller_than_a_block_is_refused():
    model = feed_forward_and_attention_model()
    optimizer = keras_muon.Muon(ns_bucket_bytes=4 * 16 * 64 - 1)
    optimizer.attach(model)
    with pytest.raises(ValueError, match=r"smaller than one Muon block of up1/kernel, 16×64"):
        optimizer.build(model.trainable_variables)
    with pytest.raises(ValueError, match="ns_bucket_bytes"):
        keras_muon.Muon(ns_bucket_bytes=0)
    config = keras_muon.Muon(ns_bucket_bytes=2**20).get_config()
    assert keras_muon.Muon.from_config(config).ns_bucket_bytes == 2**20
