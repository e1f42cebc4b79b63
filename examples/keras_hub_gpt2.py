"""Route and train keras-hub's GPT2CausalLM with keras_muon.Muon, and compare
it with keras.optimizers.AdamW and keras.optimizers.Muon.

The model is built from a small GPT2Backbone config (random initialisation,
no preset, no download) over a 256-byte vocabulary, and trained on the same
text as examples/char_transformer.py (CPython's `pydoc_data`). The routing
table shows how keras_muon handles a third-party model: the tied
ReversibleEmbedding (token embedding and LM head in one) and the position
embedding go to AdamW; the attention EinsumDense kernels and the
feed-forward Dense kernels go to Muon. Every optimizer starts from the same
initial weights, sees the same batches in the same order and follows the
same schedule shape (10% linear warm-up, then cosine decay to 10%) peaking
at its own default learning rate (`--learning-rate` gives them all one
peak instead).

Prints the routing table, Keras's progress bar per evaluation interval and
a table of validation loss and wall time; writes the curves to
<output>/keras_hub_gpt2.png and .json.

    KERAS_BACKEND=jax python examples/keras_hub_gpt2.py
"""

import keras
import keras_hub
import numpy as np

import common

VOCABULARY = 256  # bytes


def gpt2(sequence_length, width, depth, heads):
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCABULARY,
        num_layers=depth,
        num_heads=heads,
        hidden_dim=width,
        intermediate_dim=4 * width,
        dropout=0.0,
        max_sequence_length=sequence_length,
    )
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def with_padding_mask(pair):
    """GPT2CausalLM's input dict for full (unpadded) byte windows."""
    tokens, labels = pair
    return {"token_ids": tokens, "padding_mask": np.ones_like(tokens, dtype=bool)}, labels


def main(argv=None):
    parser = common.argument_parser(__doc__, steps=300)
    common.add_text_model_flags(parser)
    args = parser.parse_args(argv)

    train, validation = common.text_windows(
        args.sequence_length, args.steps * args.batch_size, args.validation_size, args.seed
    )
    data = with_padding_mask(train), with_padding_mask(validation)
    keras.utils.set_random_seed(args.seed)
    weights = gpt2(args.sequence_length, args.width, args.depth, args.heads).get_weights()

    def train_one(name, peak):
        return common.train(
            name,
            peak,
            lambda: gpt2(args.sequence_length, args.width, args.depth, args.heads),
            weights,
            data,
            args.steps,
            args.batch_size,
            args.eval_every,
            {
                "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                "weighted_metrics": [],
            },
        )

    return common.compare(
        args,
        "keras_hub_gpt2",
        f"keras-hub GPT2CausalLM, {args.steps} steps of {args.batch_size}×{args.sequence_length} bytes",
        train_one,
        {"validation loss": "val_loss"},
        ["val_loss", "loss"],
    )


if __name__ == "__main__":
    main()
