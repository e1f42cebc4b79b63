"""The torch backend's multi-tensor twins equal the generic update.

Formula by formula, each twin in backends/torch_foreach.py is run on a
list of tensors of several shapes and compared with its generic formula in
update/rule.py applied to each tensor; phase by phase and end to end, the
optimizer's update with the twins is compared with the generic phases,
over three steps from the same weights and gradients, on every route:
Muon kernels (attention heads, feed-forward, a tall kernel), AdamW
variables (embedding, biases, norms, the head), 16-bit variables, weight
decay plain, cautious and excluded, Nesterov or not, NorMuon, AdaMuon,
QK-Clip and Hyperball. On CPU the two agree bit for bit, and the tests ask for that;
fused multi-tensor kernels on GPUs may round differently.
"""

import keras
import numpy as np
import pytest
from keras import ops

import keras_muon
from keras_muon.checkpoint import positional_variables
from keras_muon.update import rule

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="the multi-tensor update is torch's"
)

STEPS = 3
SHAPES = [(5, 7), (16,), (3, 4, 2), (1, 9)]

CASES = {
    "Muon": (keras_muon.Muon, {}),
    "Muon without Nesterov": (keras_muon.Muon, {"nesterov": False}),
    "Muon, cautious weight decay": (keras_muon.Muon, {"cautious_weight_decay": True}),
    "Muon, some variables not decayed": (keras_muon.Muon, {}),
    "Muon, scale jordan, AdamW at 0.1×": (
        keras_muon.Muon,
        {"scale": "jordan", "adam_lr_ratio": 0.1},
    ),
    "NorMuon": (keras_muon.NorMuon, {}),
    "AdaMuon": (keras_muon.AdaMuon, {}),
    "AdaMuon, cautious": (keras_muon.AdaMuon, {"cautious_weight_decay": True}),
    "Muon, QK-Clip": (keras_muon.Muon, {"qk_clip_threshold": 0.05}),
    "Muon, Hyperball": (keras_muon.Muon, {"hyperball": True}),
    "NorMuon, Hyperball": (keras_muon.NorMuon, {"hyperball": True}),
}


def torch_foreach():
    from keras_muon.backends import torch_foreach

    return torch_foreach


def tensors(seed, shapes=SHAPES, positive=False):
    import torch

    rng = np.random.default_rng(seed)
    arrays = [rng.normal(size=shape).astype("float32") for shape in shapes]
    if positive:
        arrays = [np.abs(a) + 0.01 for a in arrays]
    # Some entries of equal sign and exact zeros, for the cautious mask.
    for a in arrays:
        a.reshape(-1)[0] = 0.0
    return [torch.tensor(a) for a in arrays]


def copies(values):
    return [v.clone() for v in values]


def assert_identical(twin, generic):
    assert len(twin) == len(generic)
    for a, b in zip(twin, generic):
        np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))


def scalar(value):
    import torch

    return torch.tensor(value, dtype=torch.float32)


@pytest.mark.parametrize("nesterov", [True, False])
def test_momentum_and_direction(nesterov):
    momentums, gradients = tensors(0), tensors(1)
    generic = [
        rule.momentum_and_direction(m, g, 0.95, nesterov) for m, g in zip(momentums, gradients)
    ]
    twin_momentums = copies(momentums)
    directions = torch_foreach().momentum_and_direction(twin_momentums, gradients, 0.95, nesterov)
    assert_identical(twin_momentums, [m for m, _ in generic])
    assert_identical(directions, [d for _, d in generic])


def test_adamw_moments():
    ms, vs, gradients = tensors(2), tensors(3, positive=True), tensors(4)
    generic = [rule.adamw_moments(m, v, g, 0.9, 0.999) for m, v, g in zip(ms, vs, gradients)]
    twin_ms, twin_vs = copies(ms), copies(vs)
    torch_foreach().adamw_moments(twin_ms, twin_vs, gradients, 0.9, 0.999)
    assert_identical(twin_ms, [m for m, _ in generic])
    assert_identical(twin_vs, [v for _, v in generic])


@pytest.mark.parametrize("step", [1.0, 7.0])
def test_adamw_step(step):
    ms, vs = tensors(5), tensors(6, positive=True)
    lr, t = scalar(0.01), scalar(step)
    generic = [rule.adamw_step(m, v, lr, t, 0.9, 0.999, 1e-7) for m, v in zip(ms, vs)]
    assert_identical(torch_foreach().adamw_step(ms, vs, lr, t, 0.9, 0.999, 1e-7), generic)


@pytest.mark.parametrize("cautious", [False, True])
def test_decayed(cautious):
    weights, updates = tensors(7), tensors(8)
    rate = scalar(0.02) * 0.1  # lr·λ, as the phases form it
    generic = [rule.decayed(w, u, rate, cautious) for w, u in zip(weights, updates)]
    twin = copies(weights)
    torch_foreach().decayed(twin, updates, rate, cautious)
    assert_identical(twin, generic)
    if cautious:  # some entries decayed, some not
        changed = [
            ops.convert_to_numpy(a) != ops.convert_to_numpy(b) for a, b in zip(twin, weights)
        ]
        assert 0 < sum(c.sum() for c in changed) < sum(c.size for c in changed)


def test_descended():
    import torch

    weights, updates = tensors(9), tensors(10)
    lr, scales = scalar(0.02), [0.2 * np.sqrt(d) for d in (7, 16, 4, 9)]
    generic = [rule.descended(w, u, lr * s) for w, u, s in zip(weights, updates, scales)]
    twin = copies(weights)
    step_sizes = torch.unbind(lr * torch.tensor(scales, dtype=torch.float32))
    torch_foreach().descended(twin, copies(updates), step_sizes)
    assert_identical(twin, generic)


def language_model(dtype=None):
    """Every route: an embedding, attention (4 heads), a feed-forward pair
    (one tall kernel), layer norms, biases and an output head."""
    tokens = keras.Input((6,), dtype="int32")
    x = keras.layers.Embedding(32, 16, name="embedding", dtype=dtype)(tokens)
    x = keras.layers.LayerNormalization(name="norm", dtype=dtype)(x)
    x = x + keras.layers.MultiHeadAttention(4, 4, name="attention", dtype=dtype)(x, x)
    h = keras.layers.Dense(48, activation="relu", name="up", dtype=dtype)(x)
    x = x + keras.layers.Dense(16, name="down", dtype=dtype)(h)
    return keras.Model(tokens, keras.layers.Dense(32, name="head", dtype=dtype)(x))


def with_generic_phases(monkeypatch):
    """Makes `Muon` run its generic phases on torch, not their twins."""
    twins = [name for name, value in vars(keras_muon.Muon).items() if hasattr(value, "__wrapped__")]
    assert sorted(twins) == ["_adamw_update", "_momentum_update", "_muon_update"]
    for name in twins:
        monkeypatch.setattr(keras_muon.Muon, name, getattr(keras_muon.Muon, name).__wrapped__)


def train(case, monkeypatch, dtype=None, gradients=None):
    """The weights and optimizer state after STEPS applies of `case`, and
    the gradients applied. Without `gradients`, they come from the model
    (QK-Clip's logits with them) and the generic phases apply them; with
    them, the multi-tensor twins apply these, so that both updates see the
    same gradients."""
    import torch

    optimizer_type, options = CASES[case]
    keras.utils.set_random_seed(7)
    model = language_model(dtype)
    optimizer = optimizer_type(learning_rate=0.05, name="optimizer", **options)
    if case == "Muon, some variables not decayed":
        optimizer.exclude_from_weight_decay(var_names=["up", "gamma"])
    optimizer.attach(model)
    optimizer.build(model.trainable_variables)  # QK-Clip's probes join the model
    generic = gradients is None
    if generic:
        with_generic_phases(monkeypatch)
        rng = np.random.default_rng(3)
        tokens = ops.convert_to_tensor(rng.integers(0, 32, (4, 6)).astype("int32"))
        gradients = []
    for step in range(STEPS):
        if generic:
            loss = ops.mean(ops.square(model(tokens, training=True))) + sum(model.losses)
            variables = [v.value for v in model.trainable_variables]
            gradients.append([g.detach() for g in torch.autograd.grad(loss, variables)])
        optimizer.apply(list(gradients[step]), model.trainable_variables)
    monkeypatch.undo()
    arrays = {
        v.path: ops.convert_to_numpy(ops.cast(v, "float32")) for v in model.trainable_variables
    }
    arrays.update({v.path: ops.convert_to_numpy(v) for v in optimizer.variables})
    return arrays, optimizer, gradients


@pytest.mark.parametrize("case", list(CASES))
def test_multi_tensor_update_equals_generic_update(case, monkeypatch):
    generic, _, gradients = train(case, monkeypatch)
    fast, optimizer, _ = train(case, monkeypatch, gradients=gradients)
    routes = {row["route"] for row in optimizer.routing_table()}
    assert routes == {"muon", "adamw"}
    if optimizer.qk_clip_threshold:
        assert optimizer.clipped_heads() > 0
    assert fast.keys() == generic.keys()
    for name in fast:
        np.testing.assert_array_equal(fast[name], generic[name], err_msg=name)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_multi_tensor_update_of_16_bit_variables(dtype, monkeypatch):
    generic, _, gradients = train("Muon", monkeypatch, dtype)
    fast, optimizer, _ = train("Muon", monkeypatch, dtype, gradients)
    assert all(v.dtype == "float32" for v in positional_variables(optimizer)[2:])
    for name in fast:
        np.testing.assert_array_equal(fast[name], generic[name], err_msg=name)


@pytest.mark.parametrize(
    "optimizer_type", [keras_muon.Muon, keras_muon.NorMuon, keras_muon.AdaMuon]
)
def test_every_class_runs_the_twins(optimizer_type, monkeypatch):
    called = []
    module = torch_foreach()
    for name in ("adamw_update", "momentum_update", "muon_update"):
        phase = getattr(module, name)
        monkeypatch.setattr(
            module, name, lambda *args, name=name, phase=phase: called.append(name) or phase(*args)
        )
    model = language_model()
    optimizer = optimizer_type()
    optimizer.attach(model)
    optimizer.apply(
        [ops.ones_like(v) for v in model.trainable_variables], model.trainable_variables
    )
    assert called == ["adamw_update", "momentum_update", "muon_update"]


def test_a_subclass_overriding_a_phase_runs_its_override():
    class StillMuon(keras_muon.Muon):
        """Muon whose orthogonalized directions are zero."""

        def _momentum_update(self, entries):
            batches = super()._momentum_update(entries)
            return [batch._replace(blocks=ops.zeros_like(batch.blocks)) for batch in batches]

    # Zero directions leave the Muon kernels where they were (no weight
    # decay), while AdamW's variables move.
    model = language_model()
    optimizer = StillMuon(learning_rate=0.05, weight_decay=0.0)
    optimizer.attach(model)
    before = {v.path: ops.convert_to_numpy(v) for v in model.trainable_variables}
    optimizer.apply(
        [ops.ones_like(v) for v in model.trainable_variables], model.trainable_variables
    )
    routes = {row["path"]: row["route"] for row in optimizer.routing_table()}
    for v in model.trainable_variables:
        moved = not np.array_equal(ops.convert_to_numpy(v), before[v.path])
        assert moved == (routes[v.path] == "adamw"), v.path
