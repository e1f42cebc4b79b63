"""keras-hub's layers that hold matrices directly: mixture-of-experts
banks and others."""

import numpy as np
import pytest
from keras import ops

import keras_muon
from keras_muon import coefficient_schedule
from keras_muon.routing import keras_hub as routing_keras_hub
from keras_muon.routing.keras_layers import route_by_layer
from tests import reference

keras_hub = pytest.importorskip("keras_hub")
HIDDEN, EXPERT_UNITS, EXPERTS = 16, 12, 4
ATTENTION = dict(
    vocabulary_size=64, num_layers=1, num_query_heads=2, num_key_value_heads=1, hidden_dim=HIDDEN
)
UP = ((HIDDEN, EXPERT_UNITS), EXPERTS)
FUSED_UP = ((HIDDEN, EXPERT_UNITS), 2 * EXPERTS)
DOWN = ((EXPERT_UNITS, HIDDEN), EXPERTS)
# name: (config, {expert variable path suffix: ((d_in, d_out), blocks)}).
MOE_MODELS = {
    "Mixtral": (
        dict(ATTENTION, intermediate_dim=EXPERT_UNITS, num_experts=EXPERTS),
        {
            "experts/expert_feedforward_gate_dense": UP,
            "experts/expert_feedforward_intermediate_dense": UP,
            "experts/expert_feedforward_output_dense": DOWN,
        },
    ),
    "QwenMoe": (
        dict(
            ATTENTION,
            intermediate_dim=24,
            moe_intermediate_dim=EXPERT_UNITS,
            shared_expert_intermediate_dim=20,
            num_experts=EXPERTS,
            top_k=2,
        ),
        {
            "experts/expert_feedforward_gate_dense": FUSED_UP,
            "experts/expert_feedforward_output_dense": DOWN,
        },
    ),
    "Qwen3Moe": (
        dict(
            ATTENTION,
            intermediate_dim=24,
            moe_intermediate_dim=EXPERT_UNITS,
            num_experts=EXPERTS,
            top_k=2,
            head_dim=8,
        ),
        {
            "experts/expert_feedforward_gate_dense": FUSED_UP,
            "experts/expert_feedforward_output_dense": DOWN,
        },
    ),
    "Qwen3_5Moe": (
        dict(
            ATTENTION,
            head_dim=8,
            moe_intermediate_dim=EXPERT_UNITS,
            shared_expert_intermediate_size=20,
            num_experts=EXPERTS,
            top_k=2,
            linear_num_key_heads=2,
            linear_num_value_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
        ),
        {
            "experts/expert_feedforward_gate_dense": FUSED_UP,
            "experts/expert_feedforward_output_dense": DOWN,
        },
    ),
    "GptOss": (
        dict(ATTENTION, intermediate_dim=EXPERT_UNITS, num_experts=EXPERTS, top_k=2, head_dim=8),
        {"experts/gate_up_proj": FUSED_UP, "experts/down_proj": DOWN},
    ),
    "Gemma4": (
        dict(
            ATTENTION,
            image_size=16,
            intermediate_dim=24,
            head_dim=8,
            enable_moe_block=True,
            num_experts=EXPERTS,
            expert_intermediate_dim=EXPERT_UNITS,
            num_experts_per_token=2,
        ),
        {
            "moe_expert_bank/gate_proj": UP,
            "moe_expert_bank/up_proj": UP,
            "moe_expert_bank/down_proj": DOWN,
        },
    ),
}


def causal_lm(name):
    backbone_type = getattr(keras_hub.models, f"{name}Backbone", None)
    task_type = getattr(keras_hub.models, f"{name}CausalLM", None)
    if backbone_type is None or task_type is None:
        pytest.skip(f"this keras-hub has no {name}CausalLM")
    return task_type(backbone=backbone_type(**MOE_MODELS[name][0]), preprocessor=None)


def expert_rows(table, name):
    """{suffix: row} of the expert variables of `name` in `table`."""
    suffixes = MOE_MODELS[name][1]
    rows = {s: [row for path, row in table.items() if path.endswith(s)] for s in suffixes}
    assert all(len(found) == 1 for found in rows.values()), rows
    return {s: found[0] for s, found in rows.items()}


@pytest.mark.parametrize("name", list(MOE_MODELS))
def test_expert_banks_route_to_muon_per_expert(name):
    model = causal_lm(name)
    optimizer = keras_muon.Muon()
    model.compile(optimizer=optimizer, loss="mse")
    optimizer.build(model.trainable_variables)
    table = {row["path"]: row for row in optimizer.routing_table()}
    for suffix, row in expert_rows(table, name).items():
        expected_matrix, expected_blocks = MOE_MODELS[name][1][suffix]
        assert row["route"] == "muon", row
        assert (row["matrix_shape"], row["num_blocks"]) == (expected_matrix, expected_blocks), row
    # No matrix in these models is left to the unknown-layer fallback.
    unknown = [r for r in table.values() if "unknown" in r["reason"] and len(r["shape"]) > 1]
    assert not unknown


def test_fused_views_read_the_matrices_the_layers_multiply_by():
    bank = np.arange(3 * 4 * 10, dtype="float32").reshape(3, 4, 10)  # (E, d, 2·5)
    halves = ops.convert_to_numpy(routing_keras_hub.fused_halves_view(bank.shape).to_blocks(bank))
    interleaved = ops.convert_to_numpy(
        routing_keras_hub.interleaved_view(bank.shape).to_blocks(bank)
    )
    assert halves.shape == interleaved.shape == (6, 4, 5)
    for expert in range(3):
        # `gate, up = ops.split(x @ W, 2, axis=-1)` (Qwen MoE)
        np.testing.assert_array_equal(halves[2 * expert], bank[expert][:, :5])
        np.testing.assert_array_equal(halves[2 * expert + 1], bank[expert][:, 5:])
        # `gate, up = (x @ W)[..., ::2], (x @ W)[..., 1::2]` (GPT-OSS)
        np.testing.assert_array_equal(interleaved[2 * expert], bank[expert][:, ::2])
        np.testing.assert_array_equal(interleaved[2 * expert + 1], bank[expert][:, 1::2])


# NumPy blocks written from the layouts, independently of MatrixView.
def per_expert(w):
    return w


def halves(w):
    e, d, f2 = w.shape
    return w.reshape(e, d, 2, f2 // 2).transpose(0, 2, 1, 3).reshape(2 * e, d, f2 // 2)


def interleaved(w):
    e, d, f2 = w.shape
    return w.reshape(e, d, f2 // 2, 2).transpose(0, 3, 1, 2).reshape(2 * e, d, f2 // 2)


NUMPY_VIEWS = {"Mixtral": {}, "Gemma4": {}, "GptOss": {"experts/gate_up_proj": interleaved}}


for _name in ("QwenMoe", "Qwen3Moe", "Qwen3_5Moe"):
    NUMPY_VIEWS[_name] = {"experts/expert_feedforward_gate_dense": halves}


@pytest.mark.parametrize("name", list(MOE_MODELS))
def test_each_expert_is_orthogonalized_on_its_own(name):
    model = causal_lm(name)
    optimizer = keras_muon.Muon(learning_rate=0.02, weight_decay=0.1)
    optimizer.attach(model)
    variables = model.trainable_variables
    rng = np.random.default_rng(7)
    grads = [rng.normal(size=v.shape).astype("float32") for v in variables]
    before = {v.path: ops.convert_to_numpy(v).astype(np.float64) for v in variables}
    optimizer.apply([ops.convert_to_tensor(g) for g in grads], variables)
    gradient = {v.path: g.astype(np.float64) for v, g in zip(variables, grads)}
    after = {v.path: ops.convert_to_numpy(v) for v in variables}
    schedule = coefficient_schedule("polar_express", 5)
    for suffix in MOE_MODELS[name][1]:
        path = next(p for p in before if p.endswith(suffix))
        to_blocks = NUMPY_VIEWS[name].get(suffix, per_expert)
        blocks = to_blocks(before[path])
        _, d_in, d_out = blocks.shape
        expected, _ = reference.muon_step(
            blocks,
            np.zeros_like(blocks),
            to_blocks(gradient[path]),
            lr=0.02,
            momentum=0.95,
            nesterov=True,
            weight_decay=0.1,
            scale=reference.scale("moonlight", d_in, d_out),
            schedule=schedule,
        )
        np.testing.assert_allclose(to_blocks(after[path]), expected, atol=2e-6, err_msg=path)


def test_a_rule_the_user_registered_is_kept(isolated_rules):
    experts_type = keras_hub.src.models.mixtral.mixtral_decoder.MixtralMoeExperts
    keras_muon.register_layer_rule(
        experts_type, lambda layer, variable, per_head: keras_muon.Route(None, "mine")
    )
    model = causal_lm("Mixtral")
    optimizer = keras_muon.Muon()
    model.compile(optimizer=optimizer, loss="mse")
    optimizer.build(model.trainable_variables)
    table = {row["path"]: row for row in optimizer.routing_table()}
    assert {row["reason"] for row in expert_rows(table, "Mixtral").values()} == {"mine"}


def routing_table(model):
    optimizer = keras_muon.Muon()
    model.compile(optimizer=optimizer, loss="mse")
    optimizer.build(model.trainable_variables)
    return {row["path"]: row for row in optimizer.routing_table()}


def test_gemma4_audio_position_projection_is_a_matrix_in_an_embedding_class():
    from keras_hub.src.models.gemma4 import gemma4_audio_encoder

    layer = gemma4_audio_encoder.Gemma4AudioRelativePositionEmbedding(
        hidden_size=16, num_heads=2, context_left=5, context_right=0
    )
    routing_keras_hub.register_if_imported()  # as building the optimizer does
    route = route_by_layer(layer, layer.pos_proj, per_head=False)
    assert route.view is not None and route.view.matrix_shape == (16, 16), route


def test_rwkv7_low_rank_projections_are_matrices():
    backbone = keras_hub.models.RWKV7Backbone(
        hidden_size=32, head_size=16, num_layers=1, vocabulary_size=64, intermediate_dim=64
    )
    table = routing_table(backbone)
    factors = {
        p: r for p, r in table.items() if p.split("/")[-1] in ("w1", "w2", "a1", "a2", "g1", "g2")
    }
    assert len(factors) == 6
    for row in factors.values():
        assert (row["route"], row["matrix_shape"]) == ("muon", row["shape"]), row
    gain = next(r for p, r in table.items() if p.endswith("/r_k"))
    assert gain["route"] == "adamw"


def test_gated_delta_net_conv_is_a_depthwise_filter():
    table = routing_table(causal_lm("Qwen3_5Moe"))
    row = next(r for p, r in table.items() if p.endswith("linear_attn/conv1d_kernel"))
    assert (row["route"], row["reason"]) == ("adamw", "Qwen3_5GatedDeltaNet depthwise conv kernel")
