"""Records, or checks, a few short training runs bit for bit.

A change that is not meant to alter behaviour (a refactor, a formatting
pass, a new feature that is off by default) must leave every weight, every
optimizer variable and every route of these runs exactly as they were.
Record on the commit before the change, check on the commit after, on each
backend:

    KERAS_BACKEND=jax python scripts/golden_runs.py record /tmp/golden
    KERAS_BACKEND=jax python scripts/golden_runs.py check /tmp/golden

The runs cover the three optimizers and the options that change what the
update computes (per-head blocks, QK-Clip, cautious decay, Hyperball, LoRA
factors, gradient accumulation), on a small transformer with attention,
feed-forward, embedding and normalization layers (the char transformer
of examples/) and on a grouped-query attention model.
"""

import argparse
import json
import sys
from pathlib import Path

import keras
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]
import keras_muon  # noqa: E402
from char_transformer import char_transformer  # noqa: E402
from keras_muon import checkpoint  # noqa: E402
from tests.qk_clip.attention import attention_model  # noqa: E402

STEPS = 4
SEQUENCE = 8
# name: (optimizer class, its arguments, model kind, LoRA rank or None)
RUNS = {
    "muon": (keras_muon.Muon, {}, "mha", None),
    "muon_per_head": (keras_muon.Muon, {"per_head": True}, "mha", None),
    "muon_gqa_qk_clip": (keras_muon.Muon, {"qk_clip_threshold": 1.0}, "gqa", None),
    "muon_cautious_hyperball": (
        keras_muon.Muon,
        {"cautious_weight_decay": True, "hyperball": True},
        "mha",
        None,
    ),
    "muon_lora": (keras_muon.Muon, {}, "mha", 2),
    "muon_accumulate": (keras_muon.Muon, {"gradient_accumulation_steps": 2}, "mha", None),
    "normuon_per_head": (keras_muon.NorMuon, {"per_head": True}, "mha", None),
    "adamuon": (keras_muon.AdaMuon, {}, "gqa", None),
}


def train(optimizer_type, options, kind, lora_rank):
    """Trains a fresh model for STEPS steps; returns its arrays and routes."""
    keras.utils.set_random_seed(0)
    if kind == "gqa":
        model = attention_model("gqa")
    else:
        model = char_transformer(SEQUENCE, width=16, depth=1, heads=2)
    if lora_rank:
        for layer in model._flatten_layers():
            if isinstance(layer, keras.layers.EinsumDense):
                layer.enable_lora(lora_rank)
    optimizer = optimizer_type(learning_rate=0.01, **options)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    inputs, targets = rng.integers(0, 32, (2, 8, SEQUENCE)).astype("int32")
    model.fit(inputs, targets, batch_size=len(targets), epochs=STEPS, shuffle=False, verbose=0)
    arrays = {f"weight:{v.path}": v.numpy() for v in model.weights}
    # The state by position, as files hold it, keyed without the optimizer's
    # name, which Keras numbers per process.
    arrays.update(
        {
            f"state:{i}:{v.path.split('/', 1)[-1]}": v.numpy()
            for i, v in enumerate(checkpoint.positional_variables(optimizer))
        }
    )
    routes = [{k: str(v) for k, v in row.items()} for row in optimizer.routing_table()]
    return {k: np.asarray(keras.ops.convert_to_numpy(v)) for k, v in arrays.items()}, routes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("record", "check"))
    parser.add_argument("directory", type=Path)
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    args = parser.parse_args(argv)
    backend = keras.backend.backend()
    args.directory.mkdir(parents=True, exist_ok=True)
    failures = []
    for name in args.runs:
        arrays, routes = train(*RUNS[name])
        stem = args.directory / f"{backend}_{name}"
        if args.mode == "record":
            np.savez(stem.with_suffix(".npz"), **arrays)
            stem.with_suffix(".json").write_text(json.dumps(routes, indent=1, sort_keys=True))
            continue
        recorded = dict(np.load(stem.with_suffix(".npz")))
        # The fields the record has (a newer table may add fields).
        recorded_routes = json.loads(stem.with_suffix(".json").read_text())
        same_fields = [{k: row.get(k) for k in r} for r, row in zip(recorded_routes, routes)]
        if len(recorded_routes) != len(routes) or recorded_routes != same_fields:
            failures.append(f"{name}: routes differ")
        if recorded.keys() != arrays.keys():
            failures.append(f"{name}: variables differ: {sorted(recorded.keys() ^ arrays.keys())}")
            continue
        changed = [k for k in arrays if not np.array_equal(recorded[k], arrays[k])]
        if changed:
            failures.append(f"{name}: {len(changed)} arrays differ, e.g. {changed[:3]}")
    count = len(args.runs)
    if args.mode == "record":
        print(f"{backend}: recorded {count} runs in {args.directory}")
        return 0
    for failure in failures:
        print(f"{backend}: {failure}")
    print(
        f"{backend}: {count - len({f.split(':')[0] for f in failures})} of {count} runs identical"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
