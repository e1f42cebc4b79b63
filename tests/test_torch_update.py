"""The torch backend's multi-tensor update equals `Muon._update`.

Every route is compared over three steps from the same weights and
gradients: Muon kernels (attention heads, feed-forward, a tall kernel),
AdamW variables (embedding, biases, norms, the head), 16-bit variables,
weight decay plain, cautious and excluded, Nesterov or not, NorMuon,
AdaMuon, and QK-Clip. The fast path orders every operation as
`Muon._update` does, and on CPU the two agree bit for bit; the tests allow
float32 round-off, which fused multi-tensor kernels (on GPUs) may add.
"""

import keras
import numpy as np
import pytest
from keras import ops

import keras_muon

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="the multi-tensor update is torch's"
)

STEPS = 3
# The spacing of 16-bit numbers just above 1.
EPSILON = {"bfloat16": 2.0**-7, "float16": 2.0**-10}

CASES = {
    "Muon": (keras_muon.Muon, {}),
    "Muon without Nesterov": (keras_muon.Muon, {"nesterov": False}),
    "Muon, cautious weight decay": (keras_muon.Muon, {"cautious_weight_decay": True}),
    "Muon, some variables not decayed": (keras_muon.Muon, {}),
    "Muon, scale jordan, AdamW at 0.1×": (keras_muon.Muon, {"scale": "jordan", "adam_lr_ratio": 0.1}),
    "NorMuon": (keras_muon.NorMuon, {}),
    "AdaMuon": (keras_muon.AdaMuon, {}),
    "AdaMuon, cautious": (keras_muon.AdaMuon, {"cautious_weight_decay": True}),
    "Muon, QK-Clip": (keras_muon.Muon, {"qk_clip_threshold": 0.05}),
}


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


def train(case, monkeypatch, dtype=None, gradients=None):
    """The weights and optimizer state after STEPS applies of `case`, and
    the gradients applied. Without `gradients`, they come from the model
    (QK-Clip's logits with them) and `Muon._update` applies them; with
    them, the multi-tensor update applies these, so that both updates see
    the same gradients."""
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
        monkeypatch.setattr(
            keras_muon.Muon,
            "_backend_update_step",
            lambda self, grads, variables, lr: self._update(grads, variables, lr),
        )
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
    arrays = {v.path: ops.convert_to_numpy(ops.cast(v, "float32")) for v in model.trainable_variables}
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
        # Relative to the array's size: round-off, not a wrong step (the
        # smallest step is lr·1e-3 of a weight's size here).
        scale = max(float(np.max(np.abs(generic[name]))), 1e-30)
        np.testing.assert_allclose(fast[name], generic[name], rtol=0, atol=2e-6 * scale, err_msg=name)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_multi_tensor_update_of_16_bit_variables(dtype, monkeypatch):
    generic, _, gradients = train("Muon", monkeypatch, dtype)
    fast, optimizer, _ = train("Muon", monkeypatch, dtype, gradients)
    states = {v.path for v in optimizer.variables}
    for name in fast:
        scale = max(float(np.max(np.abs(generic[name]))), 1e-30)
        if name in states:
            # float32 state: round-off.
            tolerance = 2e-6 * scale
        else:
            # The weights, rounded once to 16 bits: at most one unit in the
            # last place apart, where round-off lands on either side.
            tolerance = EPSILON[dtype] * scale
        np.testing.assert_allclose(fast[name], generic[name], rtol=0, atol=tolerance, err_msg=name)


def test_variants_use_it_and_a_subclass_overriding_a_generic_step_does_not():
    from keras_muon import torch_update

    for variant in (keras_muon.NorMuon, keras_muon.AdaMuon):
        assert torch_update.applies_to(variant, keras_muon.Muon)

    class StillMuon(keras_muon.Muon):
        def _muon_direction(self, index, gradient):
            return ops.zeros_like(super()._muon_direction(index, gradient))

    assert not torch_update.applies_to(StillMuon, keras_muon.Muon)
    # Its override takes effect: zero directions leave the Muon kernels
    # where they were (no weight decay), while AdamW's variables move.
    model = language_model()
    optimizer = StillMuon(learning_rate=0.05, weight_decay=0.0)
    optimizer.attach(model)
    before = {v.path: ops.convert_to_numpy(v) for v in model.trainable_variables}
    optimizer.apply([ops.ones_like(v) for v in model.trainable_variables], model.trainable_variables)
    routes = {row["path"]: row["route"] for row in optimizer.routing_table()}
    for v in model.trainable_variables:
        moved = not np.array_equal(ops.convert_to_numpy(v), before[v.path])
        assert moved == (routes[v.path] == "adamw"), v.path
