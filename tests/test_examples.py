"""Smoke tests of the examples and the benchmarks: a few steps at tiny sizes
on the current backend, end to end, including the plot."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import char_transformer  # noqa: E402
import common  # noqa: E402
import digits_convnet  # noqa: E402
import keras_hub_gpt2  # noqa: E402
import msign_accuracy  # noqa: E402
import muonclip  # noqa: E402
import quality  # noqa: E402
import routing_survey  # noqa: E402
import step_time  # noqa: E402


TINY_TRANSFORMER = [
    "--steps", "4", "--eval-every", "2", "--width", "16", "--depth", "1",
    "--heads", "2", "--batch-size", "4", "--validation-size", "8",
]
OPTIMIZERS = ["keras_muon.Muon", "keras.optimizers.AdamW", "keras.optimizers.Muon"]


def check_outputs(output, stem, rows, metrics):
    assert [row["optimizer"] for row in rows] == OPTIMIZERS
    for row in rows:
        assert all(math.isfinite(row[metric]) for metric in metrics), row
    assert (output / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = json.loads((output / f"{stem}.json").read_text())
    assert list(runs) == OPTIMIZERS
    return runs


def test_char_transformer(tmp_path):
    rows = char_transformer.main([*TINY_TRANSFORMER, "--output", str(tmp_path)])
    runs = check_outputs(tmp_path, "char_transformer", rows, ["validation loss", "fit seconds"])
    for curves in runs.values():
        assert curves["step"] == [0, 2, 4]
        assert len(curves["val_loss"]) == 3 and curves["loss"][0] is None


def test_examples_run_the_optimizers_named_by_the_optimizer_flag(tmp_path):
    names = ["keras_muon.NorMuon", "keras_muon.AdaMuon", "keras_muon.Muon cautious_weight_decay=True"]
    flags = [flag for name in names for flag in ("--optimizer", name)]
    rows = char_transformer.main([*TINY_TRANSFORMER, *flags, "--output", str(tmp_path)])
    assert [row["optimizer"] for row in rows] == names
    assert all(math.isfinite(row["validation loss"]) for row in rows)


def test_char_transformer_rejects_an_interval_that_does_not_divide_the_steps(tmp_path):
    with pytest.raises(ValueError, match="multiple of eval_every"):
        char_transformer.main([*TINY_TRANSFORMER, "--eval-every", "3", "--output", str(tmp_path)])


def test_muonclip(tmp_path):
    rows = muonclip.main([*TINY_TRANSFORMER, "--threshold", "0.05", "--output", str(tmp_path)])
    plain, clipped = rows
    assert plain["heads clipped"] == 0 and clipped["heads clipped"] > 0, rows
    assert plain["largest logit"] > 0.05, rows  # so there was something to clip
    assert all(math.isfinite(row["validation loss"]) for row in rows)
    assert (tmp_path / "muonclip.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = json.loads((tmp_path / "muonclip.json").read_text())["curves"]
    assert all(len(curve["max_logit"]) == 4 for curve in curves.values())


def test_digits_convnet(tmp_path):
    rows = digits_convnet.main(
        ["--epochs", "2", "--batch-size", "512", "--width", "4", "--output", str(tmp_path)]
    )
    runs = check_outputs(
        tmp_path, "digits_convnet", rows, ["validation accuracy", "validation loss"]
    )
    assert all(0.0 <= row["validation accuracy"] <= 1.0 for row in rows)
    # 1,437 training images in batches of 512: 2 steps per epoch.
    assert all(curves["step"] == [0, 2, 4] for curves in runs.values())


def test_keras_hub_gpt2(tmp_path, capsys):
    rows = keras_hub_gpt2.main([*TINY_TRANSFORMER, "--output", str(tmp_path)])
    check_outputs(tmp_path, "keras_hub_gpt2", rows, ["validation loss"])
    table = capsys.readouterr().out
    assert "output head (ReversibleEmbedding 'token_embedding')" in table
    assert "self_attention/query/kernel" in table


def test_quality_benchmark(tmp_path, capsys):
    names = [*OPTIMIZERS, "keras_muon.NorMuon"]
    summary = quality.main(
        [*TINY_TRANSFORMER, "--learning-rates", "1e-3", "1e-2", "--optimizers", *names,
         "--output", str(tmp_path)]
    )
    assert [row["optimizer"] for row in summary] == names
    adamw = summary[1]
    assert adamw["fraction of AdamW's steps"] == 1.0
    runs = json.loads((tmp_path / "quality.json").read_text())["runs"]
    assert len(runs) == 8
    assert {run["learning_rate"] for run in runs} == {1e-3, 1e-2}
    assert (tmp_path / "quality.png").exists()
    assert "final validation loss per peak learning rate" in capsys.readouterr().out


def test_quality_benchmark_passes_options_to_keras_muon(tmp_path, capsys):
    quality.main(
        [
            *TINY_TRANSFORMER, "--learning-rates", "1e-3", "--optimizers",
            "keras_muon.Muon", "keras.optimizers.AdamW", "--muon-option", "scale=jordan",
            "--muon-option", "weight_decay=0.1", "--output", str(tmp_path),
        ]
    )
    assert "options {'scale': 'jordan', 'weight_decay': 0.1}" in capsys.readouterr().out


def test_steps_to_reach_interpolates_the_first_crossing():
    curves = {"step": [0, 10, 20, 30], "val_loss": [3.0, 2.0, 1.0, 1.5]}
    assert quality.steps_to_reach(curves, 2.5) == 5.0
    assert quality.steps_to_reach(curves, 1.0) == 20.0
    assert quality.steps_to_reach(curves, 1.2) == pytest.approx(18.0)
    assert quality.steps_to_reach(curves, 0.5) is None


def test_evaluation_interval_divides_the_steps():
    assert common.evaluation_interval(600) == 50
    assert common.evaluation_interval(100) == 5  # 8, 7 and 6 do not divide 100
    assert common.evaluation_interval(7) == 1


@pytest.mark.parametrize(
    "main, argv, message",
    [
        (char_transformer.main, ["--steps", "0"], "--steps: must be a positive integer, got 0"),
        (keras_hub_gpt2.main, ["--width", "-8"], "--width: must be a positive integer, got -8"),
        (digits_convnet.main, ["--batch-size", "5000"], "larger than the 1437 training images"),
        (quality.main, ["--muon-option", "weight_decay"], "expected NAME=VALUE, got 'weight_decay'"),
    ],
)
def test_bad_flags_are_named_in_the_error(main, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_validation_windows_do_not_depend_on_the_number_of_training_windows():
    short = common.text_windows(16, 10, 8, seed=3)
    long = common.text_windows(16, 1000, 8, seed=3)
    np.testing.assert_array_equal(short[1][0], long[1][0])
    np.testing.assert_array_equal(short[0][0], long[0][0][:10])
    assert not np.array_equal(common.text_windows(16, 10, 8, seed=4)[1][0], short[1][0])


def test_step_time_benchmark(tmp_path):
    backend = keras.backend.backend()
    variants = ["keras_muon.NorMuon", "keras_muon.AdaMuon"]
    step_time.main([
        "--backend", backend, "--widths", "64", "--depth", "1", "--batch-size", "2",
        "--sequence-length", "8", "--rounds", "1", "--steps", "1", "--output", str(tmp_path),
        "--optimizers", *OPTIMIZERS, *variants,
    ])
    result = json.loads((tmp_path / f"step_time_{backend}.json").read_text())
    assert result["backend"] == backend
    entry = result["widths"]["64"]
    rows = entry["optimizers"]
    assert sorted(rows) == sorted(OPTIMIZERS + variants)
    for row in rows.values():
        assert row["train step seconds"] > 0 and row["update seconds"] > 0
    adamw = rows["keras.optimizers.AdamW"]
    assert adamw["ns flops"] == 0
    # One float32 momentum per Muon matrix instead of AdamW's two moments:
    # 4 attention projections of 64×64 and the feed-forward pair of 64×256.
    saved = adamw["state bytes"] - rows["keras_muon.Muon"]["state bytes"]
    assert saved == 4 * (4 * 64 * 64 + 2 * 64 * 256)
    # keras_muon also orthogonalizes attention: 4 blocks of 64×64 besides
    # the feed-forward pair (the down projection transposed).
    assert [group["shape"] for group in entry["newton_schulz"]] == [[4, 64, 64], [2, 64, 256]]
    assert rows["keras_muon.Muon"]["ns flops"] == sum(g["flops"] for g in entry["newton_schulz"])
    assert rows["keras.optimizers.Muon"]["ns flops"] > 0
    # NorMuon adds one float32 entry per neuron of the longer side of each
    # block (64 per attention block, 256 per feed-forward one); AdaMuon a
    # second moment the size of each matrix, as AdamW.
    muon = rows["keras_muon.Muon"]["state bytes"]
    assert rows["keras_muon.NorMuon"]["state bytes"] - muon == 4 * (4 * 64 + 2 * 256)
    assert rows["keras_muon.AdaMuon"]["state bytes"] == adamw["state bytes"]


def test_step_time_benchmark_counts_aten_ops_on_torch(tmp_path):
    if keras.backend.backend() != "torch":
        pytest.skip("the torch profiler counts torch's operations")
    step_time.main([
        "--backend", "torch", "--widths", "64", "--depth", "1", "--batch-size", "2",
        "--sequence-length", "8", "--rounds", "1", "--steps", "1", "--output", str(tmp_path),
        "--optimizers", "keras_muon.Muon",
    ])
    rows = json.loads((tmp_path / "step_time_torch.json").read_text())["widths"]["64"]["optimizers"]
    # Keras's AdamW is one multi-tensor update: a fixed number of launches.
    adamw, muon = rows["keras.optimizers.AdamW"]["aten ops"], rows["keras_muon.Muon"]["aten ops"]
    assert 0 < adamw < muon, rows


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="keras.distribution runs on JAX")
def test_distributed_step_time_benchmark(tmp_path):
    # Simulated devices are set up before JAX starts: in a process of its own.
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "distributed_step_time.py"),
         "--devices", "4", "--width", "64", "--depth", "1", "--batch-size", "4",
         "--sequence-length", "8", "--rounds", "1", "--steps", "1", "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = json.loads((tmp_path / "distributed_step_time.json").read_text())["rows"]
    flops = {(row["placement"], row["optimizer"]): row["update flops per device"] for row in rows}
    one, split, unsplit = (
        flops["one device", "keras_muon.Muon"],
        flops["DataParallel, 4 devices", "keras_muon.Muon"],
        flops["DataParallel, 4 devices", "keras_muon.Muon, unsplit"],
    )
    # 4 attention blocks of 64×64 and 2 feed-forward ones of 64×256 on 4
    # devices: the busiest orthogonalizes one of each, unsplit all of them.
    assert unsplit == one and split < 0.5 * one, flops


def test_step_time_benchmark_rejects_widths_without_whole_heads(tmp_path):
    with pytest.raises(SystemExit):
        step_time.main(["--widths", "100", "--output", str(tmp_path)])


@pytest.mark.parametrize("ns_dtype", ["float32", "bfloat16"])
def test_msign_accuracy_benchmark(ns_dtype):
    rows = msign_accuracy.main(["--shape", "16", "48", "--matrices", "2", "--ns-dtype", ns_dtype])
    assert len(rows) == 2 * len(msign_accuracy.SCHEDULES) * len(msign_accuracy.STEPS)
    # 16×48 is 3:1, iterated on its Gram matrix in float32 only.
    assert {row["iteration"] for row in rows} == {"gram" if ns_dtype == "float32" else "plain"}
    polar_express_8 = [r for r in rows if r["schedule"] == "polar_express" and r["steps"] == 8]
    # Converged: σ ≈ 1 to the iteration's precision (bfloat16 rounds each
    # product to 8 significant bits, 4e-3). In float32 the result is also
    # U·Vᵀ; in bfloat16 the directions of σ ≈ 1e-3 drown in round-off.
    tolerance = 1e-4 if ns_dtype == "float32" else 1e-2
    for row in polar_express_8:
        assert abs(row["sigma min"] - 1) < tolerance and abs(row["sigma max"] - 1) < tolerance, row
        if ns_dtype == "float32":
            assert row["max error"] < tolerance, row
    # Jordan's quintic never converges: its σ stay in about [0.7, 1.2].
    jordan = [r for r in rows if r["schedule"] == "jordan" and r["steps"] == 8]
    assert all(r["sigma max"] > 1.1 for r in jordan), jordan


def run_distributed_jax(tmp_path, *flags):
    # In a subprocess: the example splits the CPU into devices before JAX
    # starts, which this process has already done.
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "distributed_jax.py"), *flags,
         "--output", str(tmp_path)],
        env=dict(os.environ, KERAS_BACKEND="jax"), capture_output=True, text=True, timeout=600,
    )


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="keras.distribution runs on JAX")
def test_distributed_jax(tmp_path):
    completed = run_distributed_jax(
        tmp_path, *TINY_TRANSFORMER, "--batch-size", "8", "--validation-size", "16"
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    runs = json.loads((tmp_path / "distributed_jax.json").read_text())
    assert list(runs) == ["1 device", "data parallel, 8 devices", "model parallel, 4×2 mesh"]
    one_device = runs["1 device"]["val_loss"]
    for curves in runs.values():
        np.testing.assert_allclose(curves["val_loss"], one_device, atol=1e-4)
    assert (tmp_path / "distributed_jax.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The sharded kernels and their momentums, listed with one layout.
    sharded = completed.stdout.split("sharded variables")[-1]
    assert re.search(r"^block0_up/kernel +\(16, 64\) +\(None, 'model'\)$", sharded, re.M)
    assert re.search(r"/block0_up_kernel_momentum +\(16, 64\) +\(None, 'model'\)$", sharded, re.M)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="keras.distribution runs on JAX")
def test_distributed_jax_rejects_sizes_that_do_not_split_over_the_devices(tmp_path):
    completed = run_distributed_jax(tmp_path, "--model-axis", "3", "--steps", "1")
    assert completed.returncode != 0
    assert "--model-axis (3) must divide the number of devices (8)" in completed.stderr
    completed = run_distributed_jax(tmp_path, "--batch-size", "12", "--steps", "1")
    assert completed.returncode != 0
    assert "--batch-size (12) must be a multiple of the number of devices (8)" in completed.stderr
    completed = run_distributed_jax(tmp_path, "--model-axis", "4", "--heads", "2", "--steps", "1")
    assert completed.returncode != 0
    assert "--heads (2) must be a multiple of --model-axis (4)" in completed.stderr


def test_routing_survey(tmp_path, capsys):
    saved = tmp_path / "routes.json"
    models = ["MixtralCausalLM", "MobileNetV2"]
    routes = routing_survey.main(["--models", *models, "--save", str(saved)])
    assert list(routes) == models
    experts = [row for row in routes["MixtralCausalLM"] if "per expert" in row[4]]
    assert len(experts) == 3 and all(row[1] == "muon" and row[3] == 4 for row in experts)
    routing_survey.main(["--models", *models, "--compare", str(saved)])
    out = capsys.readouterr().out
    assert "| MixtralCausalLM | 13 | 8 | 17 | 2 | 0 |" in out
    assert "MixtralCausalLM: 0\nMobileNetV2: 0" in out
