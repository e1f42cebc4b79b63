"""Fused projections read as their logical matrices: the views each layout
gives, checked against NumPy slices of the kernel, and the declaration's
errors."""

import math

import keras
import numpy as np
import pytest
from keras import ops

import keras_muon
from keras_muon import FusedLayout
from keras_muon import Part
from keras_muon.routing.views import PartsView
from tests.helpers import table_for

D, HEADS, HEAD_DIM = 8, 2, 4


class Owner(keras.layers.Layer):
    """Holds one fused projection, `proj`, and reads its first `D` outputs."""

    def __init__(self, proj, num_heads=HEADS, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.proj = proj
        self.out = keras.layers.Dense(D)

    def call(self, x):
        y = self.proj(x)
        y = ops.reshape(y, (-1, y.shape[1], math.prod(y.shape[2:])))  # heads side by side
        return self.out(y[..., :D])


def routed(proj, layout, per_head, inputs=D, layout_of=None):
    """The route of `proj`'s kernel, `proj` inside an `Owner` declared with
    `layout` (or `layout_of`), and the kernel's values."""
    keras_muon.register_fused_projection(Owner, "proj", layout_of or (lambda layer: layout))
    x = keras.Input((3, inputs))
    owner = Owner(proj)
    model = keras.Model(x, keras.layers.Dense(2)(owner(x)))
    optimizer = keras_muon.Muon(per_head=per_head)
    model.compile(optimizer=optimizer, loss="mse")
    optimizer.build(model.trainable_variables)
    kernel = proj.kernel
    state = optimizer._states[optimizer._get_variable_index(kernel)]
    return state.route, ops.convert_to_numpy(kernel)


def blocks_of(view, kernel):
    """Each part's blocks of `kernel`, as NumPy arrays."""
    blocks = view.to_blocks(ops.convert_to_tensor(kernel))
    return [ops.convert_to_numpy(b) for b in (blocks if isinstance(blocks, list) else [blocks])]


@pytest.mark.parametrize("per_head", [False, True])
def test_part_major_qkv_reads_each_part_and_head(isolated_rules, per_head):
    route, w = routed(keras.layers.Dense(3 * D), FusedLayout.equal("qkv", heads=HEADS), per_head)
    (blocks,) = blocks_of(route.view, w)
    if per_head:  # part p, head h: columns p·D + h·hd ...
        expected = [
            w[:, p * D + h * HEAD_DIM :][:, :HEAD_DIM] for p in range(3) for h in range(HEADS)
        ]
    else:
        expected = [w[:, p * D : (p + 1) * D] for p in range(3)]
    np.testing.assert_array_equal(blocks, np.stack(expected))
    shape = (D, HEAD_DIM) if per_head else (D, D)
    assert route.parts == tuple((n, shape, HEADS if per_head else 1) for n in "qkv")


@pytest.mark.parametrize("per_head", [False, True])
def test_head_major_qkv_gathers_each_part_across_heads(isolated_rules, per_head):
    # GPT-NeoX: kernel (d, heads, 3·head_dim), each head [q_h | k_h | v_h].
    proj = keras.layers.EinsumDense("abc,cde->abde", output_shape=(None, HEADS, 3 * HEAD_DIM))
    layout = FusedLayout.equal("qkv", heads=HEADS, order="head_major")
    route, w = routed(proj, layout, per_head)
    (blocks,) = blocks_of(route.view, w)
    parts = [w[:, :, p * HEAD_DIM : (p + 1) * HEAD_DIM] for p in range(3)]  # (d, heads, hd)
    if per_head:
        expected = [part[:, h] for part in parts for h in range(HEADS)]
    else:
        expected = [part.reshape(D, HEADS * HEAD_DIM) for part in parts]
    np.testing.assert_array_equal(blocks, np.stack(expected))


def test_interleaved_halves(isolated_rules):
    route, w = routed(
        keras.layers.Dense(2 * D), FusedLayout.equal(("gate", "up"), order="interleaved"), False
    )
    (blocks,) = blocks_of(route.view, w)
    np.testing.assert_array_equal(blocks, np.stack([w[:, 0::2], w[:, 1::2]]))


def test_conv_1x1_qkv(isolated_rules):
    conv = keras.layers.Conv1D(3 * D, 1)
    route, w = routed(conv, FusedLayout.equal("qkv", heads=HEADS), False)
    (blocks,) = blocks_of(route.view, w)
    np.testing.assert_array_equal(
        blocks, np.stack([w[0, :, p * D : (p + 1) * D] for p in range(3)])
    )


@pytest.mark.parametrize("per_head", [False, True])
def test_unequal_sections_on_the_output_side(isolated_rules, per_head):
    # Flux's linear1: [q | k | v | mlp_in], q, k, v of HEADS heads.
    layout = FusedLayout((*(Part(n, D, HEADS) for n in "qkv"), Part("mlp_in", 12)))
    route, w = routed(keras.layers.Dense(3 * D + 12), layout, per_head)
    assert isinstance(route.view, PartsView)
    got = blocks_of(route.view, w)
    if per_head:
        qkv = [w[:, c : c + HEAD_DIM] for c in range(0, 3 * D, HEAD_DIM)]
    else:
        qkv = [w[:, c : c + D] for c in range(0, 3 * D, D)]
    if per_head:  # q, k and v per head, one part each; mlp_in whole
        np.testing.assert_array_equal(got[0], np.stack(qkv[:HEADS]))
    else:
        np.testing.assert_array_equal(got[0], np.stack(qkv[:1]))
    np.testing.assert_array_equal(got[-1], w[None, :, 3 * D :])
    assert route.parts[-1] == ("mlp_in", (D, 12), 1)


def test_unequal_sections_on_the_input_side(isolated_rules):
    # Flux's linear2 reads concat([attention (D), mlp (12)]).
    layout = FusedLayout((Part("attention", D, HEADS), Part("mlp_out", 12)), side="input")
    route, w = routed(keras.layers.Dense(D), layout, True, inputs=D + 12)
    attention, mlp = blocks_of(route.view, w)
    np.testing.assert_array_equal(attention, np.stack([w[:HEAD_DIM], w[HEAD_DIM:D]]))
    np.testing.assert_array_equal(mlp, w[None, D:])
    assert route.parts == (("attention", (HEAD_DIM, D), HEADS), ("mlp_out", (12, D), 1))


def test_sections_of_one_head_dim_are_one_view_per_head(isolated_rules):
    # Gated DeltaNet: q and k of 2 heads, v of 4, all of head dim 4.
    layout = FusedLayout((Part("q", 8, 2), Part("k", 8, 2), Part("v", 16, 4)))
    route, w = routed(keras.layers.Dense(32), layout, True)
    assert isinstance(route.view, keras_muon.MatrixView)
    (blocks,) = blocks_of(route.view, w)
    np.testing.assert_array_equal(blocks, np.stack([w[:, c : c + 4] for c in range(0, 32, 4)]))
    whole, _ = routed(keras.layers.Dense(32), layout, False)
    assert [p.matrix_shape for p in whole.view.parts] == [(D, 8), (D, 8), (D, 16)]


def test_layers_without_a_declaration_keep_their_routes(isolated_rules):
    x, owner = keras.Input((3, D)), Owner(keras.layers.Dense(3 * D))
    model = keras.Model(x, keras.layers.Dense(2)(owner(x)))
    before = table_for(model)
    keras_muon.register_fused_projection(Owner, "missing", lambda layer: None)
    with pytest.warns(UserWarning, match="holds no layer with a kernel there"):
        assert table_for(model) == before
    assert before[owner.proj.kernel.path]["parts"] == ()
    assert before[owner.proj.kernel.path]["num_blocks"] == 1


@pytest.mark.parametrize(
    "layout, message",
    [
        (FusedLayout((Part("q", D), Part("kv", D))), "do not tile its fused side of 24"),
        (FusedLayout.equal("qkv", heads=3), "no 3 equal heads"),
        (FusedLayout((Part("q", 16), Part("k", 8)), order="head_major"), "one size"),
        (FusedLayout.equal("qk", heads=2, order="interleaved"), "no heads"),
    ],
)
def test_a_layout_that_does_not_fit_the_kernel_is_an_error(isolated_rules, layout, message):
    with pytest.raises(ValueError, match=message) as error:
        routed(keras.layers.Dense(3 * D), layout, False)
    assert "Owner.proj" in str(error.value) and "(8, 24)" in str(error.value)


def test_a_failing_layout_function_names_the_layer(isolated_rules):
    with pytest.raises(ValueError, match="declared for .*Owner.proj.* failed: AttributeError"):
        routed(keras.layers.Dense(3 * D), None, False, layout_of=lambda layer: layer.head_count)


def test_an_input_fusion_of_a_kernel_reading_several_axes_is_refused(isolated_rules):
    layout = FusedLayout.equal("ab", side="input")
    with pytest.raises(ValueError, match="reads several axes"):
        routed(keras.layers.Conv1D(D, 3, padding="same"), layout, False)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"parts": ("q", "k")}, "sequence of `Part`"),
        ({"parts": (Part("q"), Part("q"))}, "name of its own"),
        ({"parts": (Part("q"),), "order": "diagonal"}, "`order` must be one of"),
        ({"parts": (Part("q"),), "side": "left"}, "`side` must be one of"),
    ],
)
def test_a_malformed_layout_is_refused_where_it_is_made(arguments, message):
    with pytest.raises(ValueError, match=message):
        FusedLayout(**arguments)


def test_registration_errors():
    with pytest.raises(ValueError, match="keras.Layer subclass"):
        keras_muon.register_fused_projection(int, "qkv", lambda layer: None)
    with pytest.raises(ValueError, match="attribute name"):
        keras_muon.register_fused_projection(Owner, "", lambda layer: None)
    with pytest.raises(ValueError, match="a function of the layer that returns a FusedLayout"):
        keras_muon.register_fused_projection(Owner, "proj", FusedLayout.equal("qkv"))
