"""tf.distribute strategies on 2 logical CPU devices, and
MultiWorkerMirroredStrategy over 2 local worker processes, compared with
one device (the training runs in subprocesses: see distributed_cases.py);
a checkpoint saved under MirroredStrategy resumes under it and on one
device."""

import numpy as np
import pytest

from tests.backends.distributed_cases import BACKEND
from tests.backends.distributed_cases import BLOCK_BATCHES
from tests.backends.distributed_cases import DEPTH
from tests.backends.distributed_cases import STEPS
from tests.backends.distributed_cases import TF_STRATEGIES
from tests.backends.distributed_cases import check_clipped_as_on_one_device
from tests.backends.distributed_cases import check_matches_one_device
from tests.backends.distributed_cases import differences
from tests.backends.distributed_cases import run_case
from tests.backends.distributed_cases import run_processes
from tests.backends.distributed_cases import train_tf_loop


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute runs on TensorFlow")
@pytest.mark.parametrize("strategy", TF_STRATEGIES)
def test_tf_strategy_matches_one_device(tmp_path, strategy):
    result = run_case(f"tensorflow:{strategy}", tmp_path)
    check_matches_one_device(result)
    calls = result["newton_schulz calls"]
    if strategy == "OneDeviceStrategy":
        # Updates one variable at a time, where it lives.
        assert list(calls) == ["CPU:1"] and len(calls["CPU:1"]) % (6 * DEPTH) == 0, calls
        return
    assert result["max difference between replicas"] == 0.0
    check_clipped_as_on_one_device(result["QK-Clip"])
    assert result["QK-Clip"]["max difference between replicas"] == 0.0
    for row in result["state"]:
        assert row["class"] == "MirroredVariable" and len(row["devices"]) == 2, row
    # Each replica orthogonalizes half of the blocks of each shape, once
    # per trace; with split_newton_schulz=False, all of them.
    shares = [(count // 2, *shape) for count, *shape in BLOCK_BATCHES]
    check_one_batch_per_shape(calls, shares)
    if "without split" in result:
        check_matches_one_device(result["without split"])
        assert result["without split"]["max difference between replicas"] == 0.0
        check_one_batch_per_shape(result["without split"]["newton_schulz calls"], BLOCK_BATCHES)


def check_one_batch_per_shape(calls, batches):
    """One Newton–Schulz batch of each of `batches` per replica, per trace."""
    assert sorted(calls) == ["CPU:0", "CPU:1"]
    traces = len(calls["CPU:0"]) // len(batches)
    assert traces >= 1
    for shapes in calls.values():
        assert sorted(map(tuple, shapes)) == sorted(batches * traces)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute runs on TensorFlow")
def test_tf_mirrored_strategy_trains_raw_tf_variables(tmp_path):
    result = run_case("tensorflow_raw_variables", tmp_path)
    assert result["max weight difference"] <= 1e-6, result
    assert result["max difference between replicas"] == 0.0, result
    assert result["paths"] == ["matrix:0", "bias:0"], result


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute runs on TensorFlow")
def test_two_multi_worker_mirrored_workers_match_one_device(tmp_path):
    import tensorflow as tf

    results = run_processes("tensorflow_worker", 2, tmp_path)
    assert results == [{"replicas": 2}] * 2
    workers = [dict(np.load(tmp_path / f"process{i}.npz")) for i in range(2)]
    one_device = train_tf_loop(tf.distribute.get_strategy())
    assert all(np.array_equal(workers[0][k], workers[1][k]) for k in one_device)
    check_matches_one_device(differences(one_device, workers[0]))


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute runs on TensorFlow")
def test_tf_checkpoint_resumes_under_mirrored_strategy_and_on_one_device(tmp_path):
    result = run_case("tensorflow_checkpoint", tmp_path)
    # Under the strategy that saved it: the same computation as the
    # uninterrupted run, bit for bit, both replicas alike; its state
    # mirrored on both devices.
    mirrored = result["MirroredStrategy"]
    assert mirrored["max weight difference"] == 0.0, mirrored
    assert mirrored["max difference between replicas"] == 0.0, mirrored
    assert mirrored["state classes"] == ["MirroredVariable"], mirrored
    assert mirrored["state devices"] == [2], mirrored
    # On one device: the replicas' gradients were summed, here computed
    # whole; round-off apart.
    one_device = result["one device"]
    assert one_device["max weight difference"] <= 1e-4, one_device
    assert one_device["state devices"] == [1], one_device
    for run in (mirrored, one_device):
        # Restored at the step it was saved, then trained as many more.
        assert run["iterations"] == [STEPS, 2 * STEPS, 2 * STEPS], run
