"""Newton–Schulz split among data-parallel replicas: keras.distribution
on 8 simulated JAX devices, torch DDP over 2 processes, compared with one
device (the training runs in subprocesses: see distributed_cases.py)."""

import keras
import numpy as np
import pytest

import keras_muon
from keras_muon.backends import distributed
from keras_muon.update.newton_schulz import coefficient_schedule
from keras_muon.update.newton_schulz import newton_schulz
from keras_muon.update.newton_schulz import newton_schulz_flops
from tests.backends.distributed_cases import BACKEND
from tests.backends.distributed_cases import BLOCK_BATCHES
from tests.backends.distributed_cases import DEPTH
from tests.backends.distributed_cases import STEPS
from tests.backends.distributed_cases import check_clipped_as_on_one_device
from tests.backends.distributed_cases import check_matches_one_device
from tests.backends.distributed_cases import run_case


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
