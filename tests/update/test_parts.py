"""The update of a fused kernel, part by part, against the float64
reference: one step on a kernel read as its parts is each part's own Muon
(or NorMuon, AdaMuon, Hyperball) step, with its own scale."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_muon
from keras_muon import FusedLayout
from keras_muon import Part
from tests.helpers import ATOL
from tests.helpers import FAMILY_LEARNING_RATE
from tests.helpers import family_reference_blocks

D, HEADS, MLP = 8, 2, 12


class Block(keras.layers.Layer):
    """`linear1` writes `[q | k | v | mlp_in]`, `linear2` reads `[q ; mlp]`
    (Flux's single-stream block, in miniature)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.linear1 = keras.layers.Dense(3 * D + MLP, use_bias=False)
        self.linear2 = keras.layers.Dense(D, use_bias=False)

    def call(self, x):
        h = self.linear1(x)
        return self.linear2(ops.concatenate([h[..., :D], h[..., 3 * D :]], axis=-1))


def block_layouts():
    return {
        "linear1": FusedLayout((*(Part(n, D, HEADS) for n in "qkv"), Part("mlp_in", MLP))),
        "linear2": FusedLayout((Part("attention", D, HEADS), Part("mlp_out", MLP)), side="input"),
    }


def numpy_parts(name, w, per_head):
    """The reference's blocks of kernel `name`: NumPy slices, as
    `(sections, axis, blocks per section)`; each section's blocks
    `(n, d_in, d_out)`."""
    hd = D // HEADS
    if name == "linear1":
        sections = [w[:, i * D : (i + 1) * D] for i in range(3)] + [w[:, 3 * D :]]
        heads = [
            np.stack([s[:, h * hd : (h + 1) * hd] for h in range(HEADS)]) for s in sections[:3]
        ]
        return (heads if per_head else [s[None] for s in sections[:3]]) + [sections[3][None]], 1
    attention, mlp = w[:D], w[D:]
    heads = np.stack([attention[h * hd : (h + 1) * hd] for h in range(HEADS)])
    return [heads if per_head else attention[None], mlp[None]], 0


def reference_steps(rule, w, gradients, per_head, name, hyperball):
    """The kernel after `gradients`, each part stepped on its own."""
    parts, axis = numpy_parts(name, w.astype(np.float64), per_head)
    grads = [numpy_parts(name, g.astype(np.float64), per_head)[0] for g in gradients]
    finals = []
    for i, blocks in enumerate(parts):
        blocks = family_reference_blocks(
            blocks,
            [step[i] for step in grads],
            rule=rule,
            weight_decay=0.0 if hyperball else 0.1,
            hyperball=hyperball,
        )
        # Back to the section: heads side by side on the fused axis.
        finals.append(np.concatenate(list(blocks), axis=axis))
    return np.concatenate(finals, axis=axis)


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize(
    "optimizer_type, rule, hyperball",
    [
        (keras_muon.Muon, "muon", False),
        (keras_muon.Muon, "muon", True),
        (keras_muon.NorMuon, "normuon", False),
        (keras_muon.AdaMuon, "adamuon", False),
    ],
)
def test_each_part_steps_on_its_own(isolated_rules, optimizer_type, rule, hyperball, per_head):
    for attribute, layout in block_layouts().items():
        keras_muon.register_fused_projection(Block, attribute, lambda layer, layout=layout: layout)
    x = keras.Input((3, D))
    block = Block()
    model = keras.Model(x, keras.layers.Dense(2)(block(x)))
    options = {"hyperball": True} if hyperball else {"weight_decay": 0.1}
    optimizer = optimizer_type(
        learning_rate=FAMILY_LEARNING_RATE,
        per_head=per_head,
        ns_coefficients="polar_express",
        **options,
    )
    optimizer.attach(model)
    kernels = [block.linear1.kernel, block.linear2.kernel]
    initial = [ops.convert_to_numpy(k) for k in kernels]
    rng = np.random.default_rng(3)
    gradients = [[rng.normal(size=k.shape).astype("float32") for k in kernels] for _ in range(2)]
    for step in gradients:
        optimizer.apply([ops.convert_to_tensor(g) for g in step], kernels)
    for i, (name, kernel) in enumerate(zip(("linear1", "linear2"), kernels)):
        expected = reference_steps(
            rule, initial[i], [s[i] for s in gradients], per_head, name, hyperball
        )
        np.testing.assert_allclose(ops.convert_to_numpy(kernel), expected, atol=ATOL, err_msg=name)


def test_a_part_takes_its_own_step_where_gradients_differ_in_scale(isolated_rules):
    # Whole, the part with the largest gradient takes the step; as parts,
    # each part's update has the RMS its scale gives it.
    keras_muon.register_fused_projection(
        Block, "linear1", lambda layer: FusedLayout.equal("qkv", heads=HEADS)
    )

    class QKV(Block):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.linear1 = keras.layers.Dense(3 * D, use_bias=False)

        def call(self, x):
            return self.linear2(self.linear1(x)[..., :D])

    x = keras.Input((3, D))
    block = QKV()
    model = keras.Model(x, keras.layers.Dense(2)(block(x)))
    optimizer = keras_muon.Muon(learning_rate=1.0, weight_decay=0.0, scale="naive")
    optimizer.attach(model)
    kernel = block.linear1.kernel
    before = ops.convert_to_numpy(kernel)
    rng = np.random.default_rng(0)
    gradient = rng.normal(size=kernel.shape) * np.repeat([1.0, 1e-3, 1e-6], D)
    optimizer.apply([ops.convert_to_tensor(gradient.astype("float32"))], [kernel])
    step = before - ops.convert_to_numpy(kernel)
    rms = [np.sqrt(np.mean(step[:, p * D : (p + 1) * D] ** 2)) for p in range(3)]
    # msign of a square block: every singular value 1, RMS 1/sqrt(D).
    np.testing.assert_allclose(rms, 1 / np.sqrt(D), rtol=0.05)


class HeadMajor(keras.layers.Layer):
    """GPT-NeoX's fused projection: kernel `(d, heads, 3·head_dim)`, each
    head's `[q_h | k_h | v_h]` side by side."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.qkv = keras.layers.EinsumDense("btd,dhe->bthe", (None, HEADS, 3 * (D // HEADS)))

    def call(self, x):
        return ops.reshape(self.qkv(x), (-1, 3, 3 * D))


@pytest.mark.parametrize("per_head", [False, True])
def test_a_head_major_kernel_steps_as_each_part_gathered_across_heads(isolated_rules, per_head):
    keras_muon.register_fused_projection(
        HeadMajor,
        "qkv",
        lambda layer: FusedLayout.equal("qkv", heads=HEADS, order="head_major"),
    )
    x = keras.Input((3, D))
    layer = HeadMajor()
    model = keras.Model(x, keras.layers.Dense(2)(layer(x)))
    optimizer = keras_muon.Muon(learning_rate=FAMILY_LEARNING_RATE, per_head=per_head)
    optimizer.attach(model)
    kernel = layer.qkv.kernel
    w = ops.convert_to_numpy(kernel).astype(np.float64)
    g = np.random.default_rng(5).normal(size=kernel.shape)
    optimizer.apply([ops.convert_to_tensor(g.astype("float32"))], [kernel])

    hd = D // HEADS
    expected = np.empty_like(w)
    for p in range(3):  # part p: columns p·hd of every head
        columns = slice(p * hd, (p + 1) * hd)
        if per_head:
            blocks, grads = w[:, :, columns].transpose(1, 0, 2), g[:, :, columns].transpose(1, 0, 2)
        else:
            blocks, grads = (
                w[None, :, :, columns].reshape(1, D, D),
                g[:, :, columns].reshape(1, D, D),
            )
        new = family_reference_blocks(blocks, [grads], rule="muon")
        expected[:, :, columns] = (
            new.transpose(1, 0, 2) if per_head else new[0].reshape(D, HEADS, hd)
        )
    np.testing.assert_allclose(ops.convert_to_numpy(kernel), expected, atol=ATOL)
