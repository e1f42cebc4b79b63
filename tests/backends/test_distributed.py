"""Newton–Schulz split among data-parallel replicas, and blocks laid out
whole orthogonalized where they live: keras.distribution on 8 simulated
JAX devices, in one process and in two, torch DDP over 2 processes, each
compared with one device (the training runs in subprocesses: see
distributed_cases.py); a checkpoint written by two processes resumes on
one device, one written under a layout of the 8 devices resumes under
another, and one written by a DDP process resumes in both."""

import keras
import numpy as np
import pytest

import keras_muon
from keras_muon.backends import distributed
from keras_muon.update.newton_schulz import coefficient_schedule
from keras_muon.update.newton_schulz import newton_schulz
from keras_muon.update.newton_schulz import newton_schulz_flops
from tests.backends.distributed_cases import BACKEND
from tests.backends.distributed_cases import BATCH
from tests.backends.distributed_cases import BLOCK_BATCHES
from tests.backends.distributed_cases import DEPTH
from tests.backends.distributed_cases import LEARNING_RATE
from tests.backends.distributed_cases import STEPS
from tests.backends.distributed_cases import check_clipped_as_on_one_device
from tests.backends.distributed_cases import check_matches_one_device
from tests.backends.distributed_cases import differences
from tests.backends.distributed_cases import fit
from tests.backends.distributed_cases import initial_weights_and_data
from tests.backends.distributed_cases import loss
from tests.backends.distributed_cases import run_case
from tests.backends.distributed_cases import run_processes
from tests.backends.distributed_cases import snapshot
from tests.backends.distributed_cases import transformer


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs on JAX")
def test_jax_fused_kernels_read_as_parts_match_one_device(tmp_path):
    result = run_case("jax_fused", tmp_path)
    # q (d, d) and kv (d, 2d): parts of two shapes in one kernel.
    assert any("('q', (64, 64), 1), ('kv', (64, 128), 1)" in p for p in result["parts"]), result
    for name in ("DataParallel", "fully sharded"):
        assert result[name] <= 1e-5, result


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs on JAX")
def test_jax_data_and_model_parallel_match_one_device(tmp_path):
    result = run_case("jax", tmp_path)
    assert result["devices"] == 8
    for distribution in ("DataParallel", "ModelParallel"):
        check_matches_one_device(result[distribution])
        check_matches_one_device(result[f"{distribution} without split"])
        check_clipped_as_on_one_device(result[f"{distribution} QK-Clip"])

    # Each device orthogonalizes one block of each shape (the 4 feed-forward
    # blocks padded to 8): what the update's compiled program executes per
    # device falls to that share; unsplit, every device does all the work.
    flops = result["update FLOPs per device"]
    one_device = sum(count * newton_schulz_flops(*shape, 5) for count, *shape in BLOCK_BATCHES)
    share = sum(newton_schulz_flops(*shape, 5) for _, *shape in BLOCK_BATCHES)
    assert flops["DataParallel without split"] >= one_device
    for distribution in ("DataParallel", "ModelParallel"):
        # The rest of the update (elementwise) is small beside Newton–Schulz.
        assert flops[distribution] - share <= 0.05 * flops["one device"], flops

    # DataParallel replicates every variable and its state on all devices.
    for row in result["DataParallel"]["state"]:
        assert row["state layout"] == row["variable layout"], row
        assert set(row["state layout"]) == {None} and row["state devices"] == 8, row

    # ModelParallel: state is sharded as its variable, variables as the map
    # says: a momentum per Muon kernel, a momentum and a velocity per AdamW
    # variable.
    sharded = {}
    for row in result["ModelParallel"]["state"]:
        assert row["state layout"] == row["variable layout"], row
        assert row["state devices"] == 8, row
        if "model" in row["state layout"]:
            sharded[row["variable"], row["state"]] = tuple(row["state layout"])
    muon_kernels = {
        f"block{i}_{name}/kernel": layout
        for i in range(DEPTH)
        for name, layout in [
            ("attention/query", (None, "model", None)),
            ("attention/key", (None, "model", None)),
            ("attention/value", (None, "model", None)),
            ("attention/attention_output", ("model", None, None)),
            ("up", (None, "model")),
            ("down", ("model", None)),
        ]
    }
    adamw = {"token_embedding/embeddings": (None, "model"), "lm_head/kernel": (None, "model")}
    expected = {(path, "momentum"): layout for path, layout in {**muon_kernels, **adamw}.items()}
    expected.update({(path, "velocity"): layout for path, layout in adamw.items()})
    assert sharded == expected
    # AdaMuon's second moment of each Muon kernel is sharded as the kernel.
    rows = result["ModelParallel AdaMuon second moments"]
    assert {row["variable"]: tuple(row["state layout"]) for row in rows} == muon_kernels
    assert all(row["state layout"] == row["variable layout"] for row in rows)
    # 16-bit variables keep a float32 state, with their layout.
    rows = result["ModelParallel bfloat16 state"]
    for row in rows:
        assert row["state dtype"] == "float32"
        assert row["state layout"] == row["variable layout"], row
    assert {(row["variable"], row["state"]) for row in rows} == set(expected)


def test_shares_cover_the_blocks_padded_with_zeros():
    blocks = np.arange(5 * 2 * 3, dtype="float32").reshape(5, 2, 3) + 1
    shares = [
        keras.ops.convert_to_numpy(distributed.share(keras.ops.convert_to_tensor(blocks), i, 3))
        for i in range(3)
    ]
    assert [share.shape for share in shares] == [(2, 2, 3)] * 3
    joined = np.concatenate(shares)
    np.testing.assert_array_equal(joined[:5], blocks)
    np.testing.assert_array_equal(joined[5:], 0.0)


def test_newton_schulz_sends_padding_to_zero():
    # Replicas orthogonalize zero blocks where shares are padded.
    schedule = coefficient_schedule("polar_express", 5)
    zeros = keras.ops.convert_to_numpy(newton_schulz(keras.ops.zeros((2, 4, 8)), schedule))
    np.testing.assert_array_equal(zeros, 0.0)


def test_split_newton_schulz_is_a_boolean_in_the_config():
    with pytest.raises(ValueError, match="split_newton_schulz"):
        keras_muon.Muon(split_newton_schulz="no")
    config = keras_muon.Muon(split_newton_schulz=False).get_config()
    assert config["split_newton_schulz"] is False
    assert keras_muon.Muon.from_config(config).split_newton_schulz is False


@pytest.mark.skipif(BACKEND != "torch", reason="DistributedDataParallel runs on torch")
def test_torch_distributed_data_parallel_matches_one_device(tmp_path):
    result = run_case("torch", tmp_path)
    check_matches_one_device(result["plain"])
    check_matches_one_device(result["without split"])
    check_clipped_as_on_one_device(result["QK-Clip"])
    for name in ("plain", "QK-Clip", "without split"):
        assert result[name]["max difference between processes"] == 0.0
    # Each process orthogonalizes half of the blocks of each shape, each
    # step; with split_newton_schulz=False, all of them.
    shares = [[count // 2, *shape] for count, *shape in BLOCK_BATCHES]
    for name, batches in [("plain", shares), ("without split", BLOCK_BATCHES)]:
        for calls in result[name]["newton_schulz calls"]:
            assert sorted(calls) == sorted(list(b) for b in batches * STEPS), (name, calls)
    # FSDP replaces torch parameters by ones Keras layers never read:
    # refused, for both of its versions.
    assert sorted(result["errors under FSDP"]) == ["FullyShardedDataParallel", "fully_shard"]
    for error in result["errors under FSDP"].values():
        assert error is not None and "torch FSDP" in error


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs on JAX")
def test_two_jax_processes_match_one_device_and_resume_on_one(tmp_path):
    results = run_processes("jax_process", 2, tmp_path)
    assert results == [{"devices": 8, "processes": 2}] * 2
    weights, data = initial_weights_and_data()
    model, optimizer = fit(weights, data, per_head=True)
    one_device = snapshot(model, optimizer)
    for name in ("DataParallel", "ModelParallel"):
        processes = [dict(np.load(tmp_path / f"process{i}.{name}.npz")) for i in range(2)]
        assert all(np.array_equal(processes[0][k], processes[1][k]) for k in one_device), name
        check_matches_one_device(differences(one_device, processes[0]))
    # Saved under ModelParallel by two processes, resumed on one device: as
    # uninterrupted training there.
    uninterrupted, _ = fit(weights, data, per_head=True)
    uninterrupted.fit(*data, batch_size=BATCH, shuffle=False, verbose=0)
    resumed = transformer()
    resumed.compile(
        optimizer=keras_muon.Muon(learning_rate=LEARNING_RATE, per_head=True), loss=loss()
    )
    resumed.optimizer.build(resumed.trainable_variables)
    resumed.load_weights(tmp_path / "process0.keras")
    assert int(resumed.optimizer.iterations) == STEPS
    resumed.fit(*data, batch_size=BATCH, shuffle=False, verbose=0)
    for got, want in zip(resumed.weights, uninterrupted.weights):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(got), keras.ops.convert_to_numpy(want), atol=1e-4
        )


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs on JAX")
def test_sharded_expert_and_tensor_parallel_layouts(tmp_path):
    result = run_case("jax_layouts", tmp_path)
    for name in (
        "fully sharded",
        "expert parallel",
        "expert parallel × fully sharded",
        "keras-hub layout map",
    ):
        assert result[name]["max weight difference"] <= 1e-4, (name, result[name])
        one_device, distributed = result[name]["clipped heads"]
        assert one_device == distributed, (name, result[name])
    assert result["fully sharded"]["clipped heads"][0] > 0
    # NorMuon's per-neuron state is sharded as its variable's blocks are:
    # a per-head query kernel (heads, d_model, head_dim) split on d_model
    # keeps (heads, d_model, 1) split on d_model; an expert bank split on
    # its expert axis keeps (experts, 1, d_out) split on it.
    state = result["fully sharded"]["sharded state"]
    assert state["block0_attention_query_kernel_neuron_second_moment"] == [None, "model", None]
    assert state["block0_attention_attention_output_kernel_neuron_second_moment"] == [
        None,
        None,
        "model",
    ]
    experts = result["expert parallel"]["sharded state"]
    assert len(experts) == 3 and all(spec == ["model", None, None] for spec in experts.values())
    llama = result["keras-hub layout map"]["sharded state"]
    assert llama["transformer_layer_0_self_attention_query_kernel_neuron_second_moment"] == [
        "batch",
        "model",
        None,
    ]
    assert result["radius layout"] == {"experts_kernel_radius": ["model"]}
    # Buckets of one block, one after another, under the fully sharded
    # layout: the same update as all blocks of a shape at once.
    bucketed = result["fully sharded, buckets of one block"]
    assert bucketed["buckets"] > bucketed["block shapes"], bucketed
    assert bucketed["max weight difference"] <= 1e-6, bucketed
    # An int8 momentum: its codes laid out as their variable, its scales
    # along the rows; the blocks are the same on one device.
    int8 = result["fully sharded, int8 momentum"]
    assert int8["layouts"] == {
        "block0_up_kernel_momentum": ["int8", ["model", None]],
        "block0_up_kernel_momentum_scales": ["float32", ["model", None]],
    }, int8
    assert int8["max weight difference"] <= 1e-4, int8
    # Expert banks laid out whole on their devices are orthogonalized there:
    # no collective at all. Fully sharded: the same collectives whatever
    # the number of Newton–Schulz steps, so none within the iteration.
    assert result["experts alone: collectives"] == {"5": {}, "10": {}}
    # Each expert split over 4 devices: one all-to-all each way among them.
    assert result["experts split: collectives"] == {"5": {"all-to-all": 2}, "10": {"all-to-all": 2}}
    # The update's scratch does not grow with the number of banks.
    for name in ("experts split", "experts alone, int8 momentum"):
        scratch = result[f"{name}: scratch bytes"]
        assert scratch["6"] <= scratch["2"], (name, scratch)
    collectives = result["fully sharded: collectives"]
    assert collectives["5"] == collectives["10"] and collectives["5"], collectives


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs on JAX")
def test_checkpoint_resumes_under_another_layout(tmp_path):
    # Saved fully sharded, resumed under DataParallel, ModelParallel and on
    # one device; saved on one device, resumed fully sharded: each goes on
    # as the uninterrupted runs do (within round-off: the layouts sum in
    # different orders), its state loaded by position into the layout
    # that state has under the new distribution.
    result = run_case("jax_checkpoint", tmp_path)
    assert len(result) == 5
    for name, move in result.items():
        for layout, difference in move["max weight difference from uninterrupted"].items():
            assert difference <= 1e-4, (name, layout, difference)
        assert move["iterations"] == [2 * STEPS, 2 * STEPS], name
        # Every state variable (step counter, learning rate, moments,
        # NorMuon's per-neuron state) laid out as in an optimizer built
        # under that distribution with nothing loaded; each moment as its
        # variable.
        restored = move["restored state"]
        assert restored["shardings"] == move["built state shardings"], name
        resumed_in = name.split(" to ")[1]
        devices = 1 if resumed_in == "one device" else 8
        for row in restored["state"]:
            assert row["state layout"] == row["variable layout"], (name, row)
            assert row["state devices"] == devices, (name, row)
        sharded = [row for row in restored["state"] if "model" in row["state layout"]]
        if resumed_in in ("fully sharded", "ModelParallel"):
            # The Muon kernels' momentums, the embedding's and the LM
            # head's momentum and velocity.
            assert len(sharded) == 6 * DEPTH + 4, (name, sharded)
        else:
            assert sharded == [], name
    # NorMuon's per-neuron state, under ModelParallel: split as the blocks
    # of its kernel are, per head on the heads, the feed-forward units on
    # their axis.
    shardings = result["NorMuon: fully sharded to ModelParallel"]["restored state"]["shardings"]
    neuron_state = {
        name.removesuffix("_kernel_neuron_second_moment"): spec
        for name, (spec, _) in shardings.items()
        if name.endswith("neuron_second_moment")
    }
    assert neuron_state == {
        f"block{i}_{name}": spec
        for i in range(DEPTH)
        for name, spec in [
            ("attention_query", ["model", None, None]),
            ("attention_key", ["model", None, None]),
            ("attention_value", ["model", None, None]),
            ("attention_attention_output", ["model", None, None]),
            ("up", [None, None, "model"]),
            ("down", [None, "model", None]),
        ]
    }


@pytest.mark.skipif(BACKEND != "torch", reason="DistributedDataParallel runs on torch")
def test_torch_checkpoint_saved_by_one_process_resumes_in_both(tmp_path):
    # Both processes load process 0's file and go on as one process
    # training uninterrupted does (within round-off: DDP averages two
    # half-batch gradients), identical to each other.
    result = run_case("torch_checkpoint", tmp_path)
    check_matches_one_device(result)
    assert result["max difference between processes"] == 0.0, result
    # Restored at the step it was saved, then trained as many more.
    assert result["iterations"] == [[STEPS, 2 * STEPS]] * 2, result
