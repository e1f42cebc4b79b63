"""Smoke tests of the examples and the benchmarks: a few steps at tiny sizes
on the current backend, end to end, including the plot."""

import argparse
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

import keras_muon

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import char_transformer  # noqa: E402
import common  # noqa: E402
import digits_convnet  # noqa: E402
import keras_hub_gpt2  # noqa: E402
import lora_finetune  # noqa: E402
import monitor_cost  # noqa: E402
import msign_accuracy  # noqa: E402
import muonclip  # noqa: E402
import quality  # noqa: E402
import routing_survey  # noqa: E402
import seeds  # noqa: E402
import spread  # noqa: E402
import step_time  # noqa: E402

TINY_TRANSFORMER = [
    "--steps",
    "4",
    "--eval-every",
    "2",
    "--width",
    "16",
    "--depth",
    "1",
    "--heads",
    "2",
    "--batch-size",
    "4",
    "--validation-size",
    "8",
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


def test_char_transformer_with_fused_kernels_reads_them_as_parts(isolated_rules):
    args = char_transformer.common.argument_parser("", steps=4)
    char_transformer.common.add_text_model_flags(args)
    args = args.parse_args(["--width", "16", "--heads", "2", "--fused", "parts"])
    model = char_transformer.model_builder(args)()
    optimizer = keras_muon.Muon(per_head=True)
    optimizer.attach(model)
    optimizer.build(model.trainable_variables)
    parts = {row["path"]: row["parts"] for row in optimizer.routing_table() if row["parts"]}
    assert parts["block0_attention/qkv/kernel"] == tuple((n, (16, 8), 2) for n in "qkv")
    assert parts["block0_swiglu/gate_up/kernel"] == (("gate", (16, 42), 1), ("up", (16, 42), 1))


def test_char_transformer_draws_the_monitors_curves(tmp_path):
    char_transformer.main([*TINY_TRANSFORMER, "--monitor", "2", "--output", str(tmp_path)])
    assert (tmp_path / "char_transformer_monitor.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    histories = json.loads((tmp_path / "char_transformer_monitor.json").read_text())
    assert list(histories) == OPTIMIZERS
    for name, history in histories.items():
        assert history["step"] == [2, 4], name
        assert all(v > 0 for v in history["muon_update_ratio"] + history["adamw_update_ratio"]), (
            name
        )
    # Newton–Schulz's singular values exist for keras_muon's optimizer only.
    muon = histories["keras_muon.Muon"]
    assert all(
        0 < low <= high
        for low, high in zip(muon["ns_min_singular_value"], muon["ns_max_singular_value"])
    )
    assert "ns_min_singular_value" not in histories["keras.optimizers.AdamW"]


def test_monitor_cost_benchmark(capsys):
    times = monitor_cost.main(
        [
            "--steps",
            "2",
            "--rounds",
            "1",
            "--width",
            "16",
            "--depth",
            "1",
            "--heads",
            "2",
            "--batch-size",
            "2",
        ]
    )
    assert list(times) == list(monitor_cost.SETTINGS)
    assert all(len(t) == 1 and t[0] > 0 for t in times.values())
    assert "MuonMonitor(every=10)" in capsys.readouterr().out


TINY_FINE_TUNING = [
    "--steps",
    "4",
    "--pretrain-steps",
    "2",
    "--eval-every",
    "2",
    "--width",
    "16",
    "--depth",
    "1",
    "--heads",
    "2",
    "--batch-size",
    "2",
    "--sequence-length",
    "8",
    "--validation-size",
    "4",
    "--rank",
    "2",
    "--learning-rates",
    "1",
]


def test_lora_finetune(tmp_path):
    rows = lora_finetune.main([*TINY_FINE_TUNING, "--output", str(tmp_path)])
    assert [row["way"] for row in rows] == list(lora_finetune.WAYS)
    for row in rows:
        assert math.isfinite(row["validation loss"]) and math.isfinite(row["pretraining text loss"])
    # LoRA trains the adapters and the adapted layers' biases only.
    full, lora = rows[0]["trained parameters"], rows[2]["trained parameters"]
    assert (
        rows[1]["trained parameters"] == full and rows[3]["trained parameters"] == lora < full / 4
    )
    assert (tmp_path / "lora_finetune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="once: routing is the same everywhere")
def test_lora_finetune_of_a_keras_hub_model(tmp_path):
    ways = ["--ways", "LoRA + AdamW", "LoRA + Muon"]
    rows = lora_finetune.main([*TINY_FINE_TUNING, *ways, "--keras-hub", "--output", str(tmp_path)])
    # backbone.enable_lora: the query and value projections (16, 2 heads,
    # 8) of the one layer, each with A (16, 2, 2), B (2, 8) and its bias.
    assert [row["trained parameters"] for row in rows] == [2 * (16 * 2 * 2 + 2 * 8 + 2 * 8)] * 2
    assert all(math.isfinite(row["validation loss"]) for row in rows)


def test_lora_finetune_routes_the_adapters_as_asked():
    # Six adapted projections (query, key, value, output, up, down) of two
    # factors each, on the route `lora` names.
    args = argparse.Namespace(
        keras_hub=False, width=16, depth=1, heads=2, sequence_length=8, rank=2
    )
    model, enable_lora = lora_finetune.build(args)
    enable_lora()
    for lora in ("muon", "adamw"):
        optimizer = keras_muon.Muon(lora=lora)
        optimizer.attach(model)
        optimizer.build(model.trainable_variables)
        factors = [row for row in optimizer.routing_table() if "lora_kernel" in row["path"]]
        assert len(factors) == 12 and {row["route"] for row in factors} == {lora}


def test_examples_run_the_optimizers_named_by_the_optimizer_flag(tmp_path):
    names = [
        "keras_muon.NorMuon",
        "keras_muon.AdaMuon",
        "keras_muon.Muon cautious_weight_decay=True",
    ]
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


# The benchmarks' bookkeeping is the same on every backend, and
# test_char_transformer trains the model on each: once is enough.
ONE_BACKEND = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="backend-independent; runs on JAX"
)


@ONE_BACKEND
def test_quality_benchmark(tmp_path, capsys):
    names = ["keras_muon.Muon", "keras.optimizers.AdamW", "keras_muon.NorMuon"]
    summary = quality.main(
        [
            *TINY_TRANSFORMER,
            "--learning-rates",
            "1e-3",
            "1e-2",
            "--optimizers",
            *names,
            "--output",
            str(tmp_path),
        ]
    )
    assert [row["optimizer"] for row in summary] == names
    adamw = summary[1]
    assert adamw["fraction of AdamW's steps"] == 1.0
    runs = json.loads((tmp_path / "quality.json").read_text())["runs"]
    assert len(runs) == 6
    assert {run["learning_rate"] for run in runs} == {1e-3, 1e-2}
    assert (tmp_path / "quality.png").exists()
    assert "final validation loss per peak learning rate" in capsys.readouterr().out


@ONE_BACKEND
def test_quality_benchmark_passes_options_to_keras_muon(tmp_path, capsys):
    quality.main(
        [
            *TINY_TRANSFORMER,
            "--learning-rates",
            "1e-3",
            "--optimizers",
            "keras_muon.Muon",
            "keras.optimizers.AdamW",
            "--muon-option",
            "scale=jordan",
            "--muon-option",
            "weight_decay=0.1",
            "--output",
            str(tmp_path),
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
        (
            quality.main,
            ["--muon-option", "weight_decay"],
            "expected NAME=VALUE, got 'weight_decay'",
        ),
    ],
)
def test_bad_flags_are_named_in_the_error(main, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_validation_windows_depend_on_neither_the_training_windows_nor_the_seed():
    short = common.text_windows(16, 10, 8, seed=3)
    long = common.text_windows(16, 1000, 8, seed=3)
    np.testing.assert_array_equal(short[1][0], long[1][0])
    np.testing.assert_array_equal(short[0][0], long[0][0][:10])
    # Another seed: other training windows, the same validation windows.
    other = common.text_windows(16, 10, 8, seed=4)
    assert not np.array_equal(other[0][0], short[0][0])
    np.testing.assert_array_equal(other[1][0], short[1][0])


def test_step_time_benchmark(tmp_path):
    backend = keras.backend.backend()
    variants = ["keras_muon.NorMuon", "keras_muon.AdaMuon"]
    step_time.main(
        [
            "--backend",
            backend,
            "--widths",
            "64",
            "--depth",
            "1",
            "--batch-size",
            "2",
            "--sequence-length",
            "8",
            "--rounds",
            "1",
            "--steps",
            "1",
            "--output",
            str(tmp_path),
            "--optimizers",
            *OPTIMIZERS,
            *variants,
        ]
    )
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
    step_time.main(
        [
            "--backend",
            "torch",
            "--widths",
            "64",
            "--depth",
            "1",
            "--batch-size",
            "2",
            "--sequence-length",
            "8",
            "--rounds",
            "1",
            "--steps",
            "1",
            "--output",
            str(tmp_path),
            "--optimizers",
            "keras_muon.Muon",
        ]
    )
    rows = json.loads((tmp_path / "step_time_torch.json").read_text())["widths"]["64"]["optimizers"]
    # Keras's AdamW is one multi-tensor update: a fixed number of launches.
    adamw, muon = rows["keras.optimizers.AdamW"]["aten ops"], rows["keras_muon.Muon"]["aten ops"]
    assert 0 < adamw < muon, rows


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="keras.distribution runs on JAX")
def test_distributed_step_time_benchmark(tmp_path):
    # Simulated devices are set up before JAX starts: in a process of its own.
    completed = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "distributed_step_time.py"),
            "--devices",
            "4",
            "--width",
            "64",
            "--depth",
            "1",
            "--batch-size",
            "4",
            "--sequence-length",
            "8",
            "--rounds",
            "1",
            "--steps",
            "1",
            "--models",
            "transformer",
            "--output",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = json.loads((tmp_path / "distributed_step_time.json").read_text())["rows"]
    by_key = {(row["model"], row["placement"], row["optimizer"]): row for row in rows}
    flops = {key: row["update flops per device"] for key, row in by_key.items()}
    one, split, unsplit = (
        flops["char transformer", "one device", "keras_muon.Muon"],
        flops["char transformer", "DataParallel, 4 devices", "keras_muon.Muon"],
        flops["char transformer", "DataParallel, 4 devices", "keras_muon.Muon, unsplit"],
    )
    # 4 attention blocks of 64×64 and 2 feed-forward ones of 64×256 on 4
    # devices: the busiest orthogonalizes one of each, unsplit all of them.
    assert unsplit == one and split < 0.5 * one, flops
    for key, row in by_key.items():
        assert row["collectives"] == row["collectives, ns_steps 10"], key
        assert row["update bytes per device"] > 0, key
    assert by_key["char transformer", "one device", "keras_muon.Muon"]["collectives"] == {}
    assert by_key["char transformer", "fully sharded, 4 devices", "keras_muon.Muon"]["collectives"]


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
        [
            sys.executable,
            str(ROOT / "examples" / "distributed_jax.py"),
            *flags,
            "--output",
            str(tmp_path),
        ],
        env=dict(os.environ, KERAS_BACKEND="jax"),
        capture_output=True,
        text=True,
        timeout=600,
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
def test_distributed_jax_rejects_sizes_that_do_not_split_over_the_devices():
    import distributed_jax

    devices = ["device"] * 8
    for flags, message in [
        (["--model-axis", "3"], "--model-axis (3) must divide the number of devices (8)"),
        (
            ["--batch-size", "12"],
            "--batch-size (12) must be a multiple of the number of devices (8)",
        ),
        (
            ["--model-axis", "4", "--heads", "2"],
            "--heads (2) must be a multiple of --model-axis (4)",
        ),
    ]:
        args = distributed_jax.argument_parser().parse_args(flags)
        with pytest.raises(ValueError, match=re.escape(message)):
            distributed_jax.distributions(args, devices)


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


def test_routing_survey_of_a_backbone_alone(capsys):
    # ViT trained alone: its last feed-forward projection writes into the
    # residual stream, and goes to Muon as under a classifier head.
    routes = routing_survey.main(["--models", "ViTBackbone", "ViTBackbone + head"])
    alone = {row[0]: row for row in routes["ViTBackbone"]}
    assert alone["vit_encoder/transformer_block_1/mlp/dense_2/kernel"][1] == "muon"
    assert not any("output head" in row[4] for row in routes["ViTBackbone"])
    assert (
        "routes that differ from the same backbone under a head\nViTBackbone: 0"
        in capsys.readouterr().out
    )


def test_routing_survey_of_fused_projections(capsys):
    # `--models` alone surveys no model: the fused projections' table only.
    routing_survey.main(["--models", "--fused", "A1", "A8", "F1"])
    out = capsys.readouterr().out
    assert out.startswith("| row | layer | kernel shape |")
    # Whole before the declarations, by parts, by parts and heads: Qwen3.5's
    # v is twice as wide as q and k; Flux's linear2 is fused on its inputs.
    assert r"| (16, 48) | 16×48 | q\|k\|v 16×16 ×3 | q\|k\|v 16×8 ×6 |" in out
    assert r"| (16, 64) | 16×64 | q\|k 16×16 ×2, v 16×32 | q\|k\|v 16×8 ×8 |" in out
    assert (
        "| (48, 16) | 48×16 | attention 16×16, mlp_out 32×16 | attention 8×16 ×2, mlp_out 32×16 |"
        in out
    )
    assert out.endswith("fused kinds read as parts: 3/3 (per_head=True: 3/3)\n")


@pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="the scale benchmark runs on JAX (bfloat16 policy)"
)
def test_scale_quality_benchmark(tmp_path, monkeypatch, capsys):
    import scale_quality  # a JAX-only benchmark, imported by its one test

    # Three runs instead of ten: two learning rates of AdamW, one of Muon.
    monkeypatch.setitem(scale_quality.GRIDS, scale_quality.ADAMW, (1e-3, 4e-3))
    monkeypatch.setitem(scale_quality.GRIDS, scale_quality.MUON, (1.6e-2,))
    names = [scale_quality.ADAMW, scale_quality.MUON]
    summary = scale_quality.main(
        [
            "--tiny",
            "--layers",
            "1",
            "--steps",
            "8",
            "--eval-every",
            "2",
            "--optimizers",
            *names,
            "--output",
            str(tmp_path),
        ]
    )
    assert keras.mixed_precision.global_policy().name == "float32"  # restored
    out = capsys.readouterr().out
    assert "final validation loss per peak learning rate" in out and "best run of each" in out
    assert (tmp_path / "scale_quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((tmp_path / "scale_quality.json").read_text())
    runs, setting = result["runs"], result["setting"]
    assert [(run["optimizer"], run["learning_rate"]) for run in runs] == [
        (names[0], 1e-3),
        (names[0], 4e-3),
        (names[1], 1.6e-2),
    ]
    assert setting["parameters"] > 0 and setting["tokens per run"] == 8 * 8 * 64
    for run in runs:
        assert run["step"] == [0, 2, 4, 6, 8] and run["tokens"] == [s * 8 * 64 for s in run["step"]]
        assert all(math.isfinite(loss) for loss in run["val_loss"]), run
    # The fractions, recomputed from the curves in the JSON.
    best = {
        name: min((r for r in runs if r["optimizer"] == name), key=lambda r: r["val_loss"][-1])
        for name in names
    }
    target = best[names[0]]["val_loss"][-1]
    adamw_steps = quality.steps_to_reach(best[names[0]], target)
    assert result["summary"] == summary and [row["optimizer"] for row in summary] == names
    for row in summary:
        run = best[row["optimizer"]]
        assert row["best lr"] == run["learning_rate"]
        assert row["final validation loss"] == run["val_loss"][-1]
        reached = quality.steps_to_reach(run, target)
        if reached is None:
            assert row["fraction of AdamW's tokens"] == "-" and min(run["val_loss"]) > target
        else:
            assert row["fraction of AdamW's tokens"] == pytest.approx(reached / adamw_steps)
            assert row["tokens to AdamW's best (M)"] == pytest.approx(reached * 8 * 64 / 1e6)
    assert summary[0]["fraction of AdamW's tokens"] == 1.0

    # The plan: 3 runs in 90% of the 90 s left, each 5 s of compilation,
    # 21 validation passes of 0.1 s and steps of 0.01 s: 1,990 steps, so
    # 1,980 in a multiple of the 20 evaluations.
    args = scale_quality.parse(["--tiny", "--time-budget", "100"])
    assert scale_quality.plan(args, 3, 10.0, 0.01, 0.1, 5.0)["steps"] == 1980
    with pytest.raises(SystemExit, match="do not fit"):
        scale_quality.plan(args, 3, 95.0, 0.01, 0.1, 5.0)


def test_golden_runs_pass_on_the_same_code_and_catch_one_changed_bit(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import golden_runs

    runs = ["muon_per_head"]
    assert golden_runs.main(["record", str(tmp_path), "--runs", *runs]) == 0
    assert golden_runs.main(["check", str(tmp_path), "--runs", *runs]) == 0
    assert "1 of 1 runs identical" in capsys.readouterr().out
    # One bit of one recorded momentum flipped: the check must fail.
    stem = tmp_path / f"{keras.backend.backend()}_{runs[0]}.npz"
    arrays = dict(np.load(stem))
    name = next(k for k in arrays if k.startswith("state:") and "momentum" in k)
    arrays[name].view("uint32").flat[0] ^= 1
    np.savez(stem, **arrays)
    assert golden_runs.main(["check", str(tmp_path), "--runs", *runs]) == 1
    assert "1 arrays differ" in capsys.readouterr().out


@ONE_BACKEND
def test_spread_and_the_significance_rule():

    assert spread.mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert spread.mean_sd_text([1.5]) == "1.500"
    assert spread.mean_sd_text([1.0, 2.0, 3.0]) == "2.000 ± 1.000"
    # Welch's t from its formula: t = (ma − mb) / sqrt(va/na + vb/nb).
    a, b = [1.20, 1.22, 1.19, 1.21, 1.23], [1.30, 1.27, 1.33, 1.29, 1.31]
    ma, va = np.mean(a), np.var(a, ddof=1)
    mb, vb = np.mean(b), np.var(b, ddof=1)
    t = (ma - mb) / np.sqrt(va / 5 + vb / 5)
    dof = (va / 5 + vb / 5) ** 2 / ((va / 5) ** 2 / 4 + (vb / 5) ** 2 / 4)
    from scipy import stats

    assert spread.welch_p_value(a, b) == pytest.approx(2 * stats.t.sf(abs(t), dof))
    assert spread.verdict(a, b).startswith("better (p=")
    assert spread.verdict(b, a).startswith("worse (p=")
    # Overlapping seeds, a single seed, no spread at all.
    assert spread.verdict([1.20, 1.25, 1.22], [1.21, 1.24, 1.23]).startswith("within noise (p=")
    assert spread.verdict([1.2], [1.3]) == "within noise"
    assert spread.welch_p_value([1.0, 1.0], [1.0, 1.0]) == 1.0


@ONE_BACKEND
def test_quality_benchmark_over_seeds(tmp_path, capsys):
    names = ["keras_muon.Muon", "keras.optimizers.AdamW"]
    quality.main(
        [
            *TINY_TRANSFORMER,
            "--learning-rates",
            "1e-3",
            "1e-2",
            "--optimizers",
            *names,
            "--seeds",
            "3",
            "--seed",
            "4",
            "--output",
            str(tmp_path),
        ]
    )
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert len(saved["runs"]) == 4  # the grid, on the first seed only
    more = saved["seeded runs"]
    assert sorted((run["optimizer"], run["seed"]) for run in more) == sorted(
        (name, seed) for name in names for seed in (5, 6)
    )
    # Each seed its own weights and batches: the curves differ.
    muon = [run["val_loss"] for run in more if run["optimizer"] == names[0]]
    assert muon[0] != muon[1]
    rows = {row["optimizer"]: row for row in saved["seeds"]}
    assert set(rows) == set(names)
    assert rows[names[0]]["validation loss"].count("±") == 1
    assert rows[names[1]]["vs AdamW"] == "-" and rows[names[0]]["vs Muon"] == "-"
    assert rows[names[0]]["vs AdamW"].split(" (")[0] in ("better", "worse", "within noise")
    assert rows[names[1]]["steps to AdamW's mean"].endswith("/3)")
    assert "over seeds 4–6" in capsys.readouterr().out


def test_seeds_summarize_each_number_over_the_seeds():
    per_seed = [
        [{"optimizer": "a", "validation loss": loss}, {"optimizer": "b", "validation loss": other}]
        for loss, other in [(1.0, 2.0), (1.1, 2.1), (1.2, 2.2)]
    ]
    rows = seeds.summary(per_seed, {"validation loss": True})
    assert rows[0] == {
        "optimizer": "a",
        "validation loss": "1.1000 ± 0.1000",
        "validation loss vs a": "",
    }
    assert rows[1]["validation loss"] == "2.1000 ± 0.1000"
    assert rows[1]["validation loss vs a"].startswith("worse (p=")


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="seed handling is backend-free")
def test_seeds_runs_an_example_once_per_seed(tmp_path, capsys):
    flags = [
        *TINY_TRANSFORMER,
        "--optimizer",
        "keras_muon.Muon",
        "--optimizer",
        "keras.optimizers.AdamW",
    ]
    rows = seeds.main(
        ["char_transformer", "--seeds", "2", "--summary-output", str(tmp_path), *flags]
    )
    assert [row["optimizer"] for row in rows] == ["keras_muon.Muon", "keras.optimizers.AdamW"]
    # Two different seeds: a spread, and a verdict of AdamW against Muon.
    assert " ± " in rows[0]["validation loss"]
    assert "validation loss vs keras_muon.Muon" in rows[1]
    assert "over 2 seeds (0 to 1)" in capsys.readouterr().out
    saved = json.loads((tmp_path / "char_transformer_seeds.json").read_text())
    assert len(saved["per seed"]) == 2 and saved["rows"] == rows


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="argument handling is backend-free")
def test_lora_finetune_runs_each_way_at_its_given_peak(tmp_path):
    ways = ["--ways", "full AdamW", "LoRA + Muon", "--peaks", "0.002", "0.02"]
    rows = lora_finetune.main([*TINY_FINE_TUNING, *ways, "--output", str(tmp_path)])
    assert [(row["way"], row["best peak lr"]) for row in rows] == [
        ("full AdamW", 0.002),
        ("LoRA + Muon", 0.02),
    ]
    with pytest.raises(SystemExit):
        lora_finetune.main([*TINY_FINE_TUNING, "--peaks", "0.01", "--output", str(tmp_path)])
