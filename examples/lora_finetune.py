"""Fine-tune a pretrained byte-level transformer four ways: all weights with
AdamW or with keras_muon.Muon, or LoRA adapters with AdamW or with Muon.

The model (examples/char_transformer.py) is first trained with AdamW on
CPython's documentation (`pydoc_data`), then fine-tuned on CPython's
standard-library source (the `.py` files beside `os.py`), both of which ship
with Python: nothing is downloaded. Every way starts from the same
pretrained weights, sees the same batches and follows the same schedule
shape (10% warm-up, cosine decay to 10%), at each peak learning rate of its
own small grid. LoRA (`layer.enable_lora(rank)` on every attention and
feed-forward projection, everything else frozen) trains only the adapters
and the adapted layers' biases:

- full AdamW: `keras.optimizers.AdamW`, every weight;
- full Muon: `keras_muon.Muon()`, every weight;
- LoRA + AdamW: `keras_muon.Muon(lora="adamw")`, adapters on its AdamW;
- LoRA + Muon: `keras_muon.Muon(lora="muon")`, each adapter factor a
  matrix of its own on Muon.

Reports, per way at its best learning rate, the validation loss on the new
text and on the pretraining text (what fine-tuning made the model forget),
and writes the curves to <output>/lora_finetune.png and .json. With
`--keras-hub`, the model is a keras-hub `GPT2CausalLM` built from a small
config (random initialization, pretrained here), and LoRA is keras-hub's
`backbone.enable_lora(rank)` (query and value projections).

    KERAS_BACKEND=jax python examples/lora_finetune.py [--keras-hub]
"""

import os
from pathlib import Path

import keras
import numpy as np

import char_transformer
import common

# way: (optimizer, its options, LoRA or not, the peak learning rates tried)
WAYS = {
    "full AdamW": ("keras.optimizers.AdamW", {}, False, (3e-4, 1e-3, 3e-3, 1e-2)),
    "full Muon": ("keras_muon.Muon", {}, False, (1e-3, 3e-3, 1e-2, 3e-2)),
    "LoRA + AdamW": ("keras_muon.Muon", {"lora": "adamw"}, True, (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)),
    "LoRA + Muon": ("keras_muon.Muon", {"lora": "muon"}, True, (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)),
}


def stdlib_source_bytes():
    """CPython's standard-library source as bytes: the `.py` files of the
    directory of `os.py`, in the order of their names."""
    files = sorted(Path(os.__file__).parent.glob("*.py"))
    return np.frombuffer(b"\n".join(path.read_bytes() for path in files), np.uint8)


def windows(data, sequence_length, count, seed):
    """`count` random next-byte windows `(x, y)` of `data`."""
    starts = np.random.default_rng(seed).integers(0, len(data) - sequence_length - 1, size=count)
    rows = data[starts[:, None] + np.arange(sequence_length + 1)]
    return rows[:, :-1].astype("int32"), rows[:, 1:].astype("int32")


def fine_tune_data(args):
    """Training and validation windows of the standard library's source:
    the first 90% of the files for training, the rest for validation."""
    data = stdlib_source_bytes()
    split = int(0.9 * len(data))
    train = windows(
        data[:split], args.sequence_length, args.steps * args.batch_size, [args.seed, 2]
    )
    validation = windows(data[split:], args.sequence_length, args.validation_size, [args.seed, 3])
    return train, validation


def char_model(args):
    return char_transformer.char_transformer(
        args.sequence_length, args.width, args.depth, args.heads
    )


def hub_model(args):
    import keras_hub

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=char_transformer.VOCABULARY,
        num_layers=args.depth,
        num_heads=args.heads,
        hidden_dim=args.width,
        intermediate_dim=4 * args.width,
        dropout=0.0,
        max_sequence_length=args.sequence_length,
    )
    causal_lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    tokens = keras.Input((args.sequence_length,), dtype="int32")
    # The causal LM takes token ids and a padding mask, and returns logits.
    logits = causal_lm({"token_ids": tokens, "padding_mask": keras.ops.ones_like(tokens)})
    return keras.Model(tokens, logits), backbone


def build(args):
    """The model, and a function that enables LoRA on it."""
    if args.keras_hub:
        model, backbone = hub_model(args)
        return model, lambda: backbone.enable_lora(args.rank)
    model = char_model(args)

    def enable_lora():
        for layer in model._flatten_layers(include_self=False):
            layer.trainable = False
        for layer in model._flatten_layers(include_self=False):
            if (
                isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))
                and layer.name != "lm_head"
            ):
                layer.trainable = True
                layer.enable_lora(args.rank)

    return model, enable_lora


def pretrained_weights(args):
    """The weights after `--pretrain-steps` of AdamW on the documentation."""
    keras.utils.set_random_seed(args.seed)
    model, _ = build(args)
    data = common.text_windows(
        args.sequence_length, args.pretrain_steps * args.batch_size, args.validation_size, args.seed
    )
    model.compile(
        optimizer=common.make_optimizer("keras.optimizers.AdamW", args.pretrain_steps, 1e-3),
        **char_transformer.LOSS,
    )
    print(f"\npretraining: {args.pretrain_steps} steps of AdamW on CPython's documentation")
    curves = common.fit_curves(model, *data, args.pretrain_steps, args.batch_size, None, verbose=0)
    print(f"validation loss {curves['val_loss'][-1]:.4f}")
    return model.get_weights(), data[1]


def fine_tune(args, way, peak, weights, data, pretraining_validation):
    """One way at one peak learning rate: its curves, and the final loss on
    the pretraining text."""
    name, options, lora, _ = WAYS[way]
    model, enable_lora = build(args)
    model.set_weights(weights)
    if lora:
        enable_lora()
    optimizer = common.make_optimizer(name, args.steps, peak, **options)
    model.compile(optimizer=optimizer, **char_transformer.LOSS)
    curves = common.fit_curves(
        model, *data, args.steps, args.batch_size, args.eval_every, verbose=0
    )
    curves["pretraining val_loss"] = model.evaluate(
        *pretraining_validation, batch_size=256, verbose=0
    )
    curves["trained parameters"] = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    return curves


def main(argv=None):
    parser = common.argument_parser(__doc__, steps=150, learning_rate=False)
    common.add_text_model_flags(parser)
    parser.add_argument(
        "--pretrain-steps",
        type=common.positive_int,
        default=400,
        help="AdamW steps on the documentation first (default 400)",
    )
    parser.add_argument("--rank", type=common.positive_int, default=8, help="LoRA rank (default 8)")
    parser.add_argument(
        "--keras-hub",
        action="store_true",
        help="a keras-hub GPT2CausalLM with backbone.enable_lora",
    )
    parser.add_argument(
        "--ways",
        nargs="+",
        choices=list(WAYS),
        default=list(WAYS),
        metavar="WAY",
        help=f"ways to fine-tune (default all: {'; '.join(WAYS)})",
    )
    parser.add_argument(
        "--learning-rates",
        type=int,
        default=None,
        metavar="N",
        help="only the first N learning rates of each grid (default all)",
    )
    parser.add_argument(
        "--peaks",
        type=float,
        nargs="+",
        default=None,
        metavar="LR",
        help="one peak learning rate per way, in the order of --ways, instead of "
        "each way's grid (to repeat the best of a grid over seeds)",
    )
    args = parser.parse_args(argv)
    if args.peaks is not None and len(args.peaks) != len(args.ways):
        parser.error(f"--peaks needs one learning rate per way ({len(args.ways)})")
    weights, pretraining_validation = pretrained_weights(args)
    data = fine_tune_data(args)
    runs, rows = {}, []
    for i, way in enumerate(args.ways):
        best = None
        grid = WAYS[way][3][: args.learning_rates] if args.peaks is None else [args.peaks[i]]
        for peak in grid:
            curves = fine_tune(args, way, peak, weights, data, pretraining_validation)
            print(
                f"{way:14s} peak lr {peak:<7g} validation loss {curves['val_loss'][-1]:.4f}, "
                f"on the pretraining text {curves['pretraining val_loss']:.4f}"
            )
            if best is None or curves["val_loss"][-1] < best[1]["val_loss"][-1]:
                best = peak, curves
        peak, curves = best
        runs[f"{way} (lr {peak:g})"] = curves
        rows.append(
            {
                "way": way,
                "best peak lr": peak,
                "trained parameters": curves["trained parameters"],
                "validation loss": curves["val_loss"][-1],
                "pretraining text loss": curves["pretraining val_loss"],
                "fit seconds": curves["seconds"],
            }
        )
    model = "keras-hub GPT2CausalLM" if args.keras_hub else "char transformer"
    stem = "lora_finetune_keras_hub" if args.keras_hub else "lora_finetune"
    title = (
        f"{model}, pretrained {args.pretrain_steps} steps, fine-tuned {args.steps} steps of "
        f"{args.batch_size}×{args.sequence_length} bytes, backend {keras.backend.backend()}"
    )
    common.print_table(title, rows)
    common.save_json(args.output, stem, {"rows": rows, "runs": runs})
    print(f"\nplot: {common.plot_curves(args.output, stem, title, runs, ['val_loss', 'loss'])}")
    return rows


if __name__ == "__main__":
    main()
