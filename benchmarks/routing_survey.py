"""How keras_muon routes the variables of real models, built small.

Builds keras-hub task models and backbones from tiny configs and
keras.applications models with `weights=None` (no downloads), routes their
trainable variables, and prints one row per model: variables, Muon
variables, Muon blocks, output-head variables and guessed heads. Backbones
trained alone are surveyed beside the same backbone under a classifier
head, and the variables routed differently are listed. With `--save FILE`
the routes are written to JSON; with `--compare FILE` the routes that
differ from a saved run are counted and listed per model. With `--fused`,
each fused projection of keras-hub (`fused_layers.py`) is routed whole (as
without its declaration), by parts and by parts and heads.

Usage:
    python benchmarks/routing_survey.py [--save routes.json] [--compare old.json]
    python benchmarks/routing_survey.py --models --fused  # the fused projections alone
"""

import argparse
import json
import sys
import warnings

import keras

import fused_layers
import keras_muon
from keras_muon import report
from keras_muon.registry import installed_classes
from keras_muon.routing.fused import FUSED_PROJECTIONS
from keras_muon.routing.keras_hub import FUSED

LM = dict(vocabulary_size=64, num_layers=1, hidden_dim=16)
DECODER = dict(LM, num_query_heads=2, num_key_value_heads=1)
ENCODER = dict(LM, num_heads=2, intermediate_dim=32, max_sequence_length=16)

# name: (task class or None for the backbone alone, backbone class, config)
KERAS_HUB = {
    "GPT2CausalLM": ("GPT2Backbone", dict(ENCODER)),
    "LlamaCausalLM": ("LlamaBackbone", dict(DECODER, intermediate_dim=32)),
    "GemmaCausalLM": (
        "GemmaBackbone",
        dict(LM, num_query_heads=2, num_key_value_heads=1, head_dim=8, intermediate_dim=32),
    ),
    "MixtralCausalLM": ("MixtralBackbone", dict(DECODER, intermediate_dim=12, num_experts=4)),
    "QwenMoeCausalLM": (
        "QwenMoeBackbone",
        dict(
            DECODER,
            intermediate_dim=24,
            moe_intermediate_dim=12,
            shared_expert_intermediate_dim=20,
            num_experts=4,
            top_k=2,
        ),
    ),
    "Qwen3MoeCausalLM": (
        "Qwen3MoeBackbone",
        dict(
            DECODER,
            intermediate_dim=24,
            moe_intermediate_dim=12,
            num_experts=4,
            top_k=2,
            head_dim=8,
        ),
    ),
    "Qwen3_5MoeCausalLM": (
        "Qwen3_5MoeBackbone",
        dict(
            DECODER,
            head_dim=8,
            moe_intermediate_dim=12,
            shared_expert_intermediate_size=20,
            num_experts=4,
            top_k=2,
            linear_num_key_heads=2,
            linear_num_value_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
        ),
    ),
    "GptOssCausalLM": (
        "GptOssBackbone",
        dict(DECODER, intermediate_dim=12, num_experts=4, top_k=2, head_dim=8),
    ),
    "Gemma4CausalLM": (
        "Gemma4Backbone",
        dict(
            DECODER,
            image_size=16,
            intermediate_dim=24,
            head_dim=8,
            enable_moe_block=True,
            num_experts=4,
            expert_intermediate_dim=12,
            num_experts_per_token=2,
        ),
    ),
    "Gemma3nCausalLM": (
        "Gemma3nBackbone",
        dict(
            text_vocab_size=64,
            text_hidden_size=16,
            num_hidden_layers=1,
            pad_token_id=0,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            intermediate_size=[32],
            hidden_activation="gelu_approximate",
            layer_types=["full_attention"],
            sliding_window=8,
            rope_theta=10000.0,
            max_position_embeddings=32,
            vocab_size_per_layer_input=64,
            hidden_size_per_layer_input=4,
            altup_num_inputs=3,
            laurel_rank=2,
        ),
    ),
    "BertMaskedLM": ("BertBackbone", dict(ENCODER)),
    "RobertaMaskedLM": ("RobertaBackbone", dict(ENCODER)),
    "DistilBertMaskedLM": ("DistilBertBackbone", dict(ENCODER)),
    "AlbertMaskedLM": ("AlbertBackbone", dict(ENCODER, embedding_dim=8)),
    "ESMMaskedPLM": ("ESMBackbone", dict(ENCODER)),
    "MoonshineBackbone": (
        "MoonshineBackbone",
        dict(
            vocabulary_size=64,
            filter_dim=16,
            encoder_num_layers=1,
            decoder_num_layers=1,
            hidden_dim=16,
            intermediate_dim=32,
            encoder_num_heads=2,
            decoder_num_heads=2,
        ),
    ),
    "RWKV7Backbone": (
        "RWKV7Backbone",
        dict(hidden_size=32, head_size=16, num_layers=1, vocabulary_size=64, intermediate_dim=64),
    ),
}

# Backbones trained alone (feature extractors; contrastive or self-supervised
# training), as keras-hub builds them: each is surveyed alone, and under a
# classifier head (`<name> + head`), as a task model uses it (SigLIP's
# outputs are image-text logits: it has no such head).
BACKBONES = {
    "BertBackbone": dict(ENCODER),
    "AlbertBackbone": dict(ENCODER, embedding_dim=8),
    "ElectraBackbone": dict(
        vocab_size=64,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        embedding_dim=16,
        intermediate_dim=32,
        max_sequence_length=16,
    ),
    "WhisperBackbone": dict(
        vocabulary_size=64,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        num_mels=8,
        max_encoder_sequence_length=16,
        max_decoder_sequence_length=16,
    ),
    "ViTBackbone": dict(
        image_shape=(16, 16, 3), patch_size=4, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32
    ),
    "DINOV2Backbone": dict(
        patch_size=4,
        num_layers=1,
        hidden_dim=16,
        num_heads=2,
        intermediate_dim=32,
        image_shape=(16, 16, 3),
        position_embedding_shape=(16, 16),
    ),
    "DINOV3Backbone": dict(
        patch_size=4,
        num_layers=1,
        hidden_dim=16,
        num_heads=2,
        intermediate_dim=32,
        image_shape=(16, 16, 3),
    ),
    "SigLIPBackbone": dict(
        vision_encoder=(
            "SigLIPVisionEncoder",
            dict(
                patch_size=4,
                hidden_dim=16,
                num_layers=1,
                num_heads=2,
                intermediate_dim=32,
                image_shape=(16, 16, 3),
            ),
        ),
        text_encoder=(
            "SigLIPTextEncoder",
            dict(
                vocabulary_size=64,
                embedding_dim=16,
                hidden_dim=16,
                num_layers=1,
                num_heads=2,
                intermediate_dim=32,
                max_sequence_length=8,
            ),
        ),
    ),
}
HEAD = " + head"

APPLICATIONS = {
    "MobileNetV2": dict(alpha=0.35),
    "ResNet50": {},
    "EfficientNetB0": {},
    "ConvNeXtTiny": {},
    "DenseNet121": {},
}


def keras_hub_model(name):
    import keras_hub

    backbone_name, config = KERAS_HUB[name]
    backbone = getattr(keras_hub.models, backbone_name)(**config)
    if name == backbone_name:
        return backbone
    return getattr(keras_hub.models, name)(backbone=backbone, preprocessor=None)


def backbone(name):
    """A backbone alone, or `<name> + head`: the same backbone under a
    classifier head on its floating-point outputs, averaged over positions."""
    import keras_hub

    config = dict(BACKBONES[name.removesuffix(HEAD)])
    for key, value in config.items():
        if isinstance(value, tuple) and isinstance(value[0], str):  # an encoder: (class, config)
            config[key] = getattr(keras_hub.models, value[0])(**value[1])
    model = getattr(keras_hub.models, name.removesuffix(HEAD))(**config)
    if not name.endswith(HEAD):
        return model
    features = [
        keras.layers.GlobalAveragePooling1D()(t) if len(t.shape) == 3 else t
        for t in keras.tree.flatten(model.outputs)
        if keras.backend.is_float_dtype(t.dtype) and t.shape[-1] is not None
    ]
    pooled = features[0] if len(features) == 1 else keras.layers.Concatenate()(features)
    return keras.Model(model.inputs, keras.layers.Dense(3, name="classifier")(pooled))


def application(name):
    return getattr(keras.applications, name)(
        weights=None, input_shape=(32, 32, 3), classes=10, **APPLICATIONS[name]
    )


def routes_of(model):
    optimizer = keras_muon.Muon()
    model.compile(optimizer=optimizer, loss="mse")
    optimizer.build(model.trainable_variables)
    return [
        [row["path"], row["route"], row["matrix_shape"], row["num_blocks"], row["reason"]]
        for row in optimizer.routing_table()
    ]


def survey(names):
    results = {}
    for name in names:
        if name in KERAS_HUB:
            build = keras_hub_model
        elif name.removesuffix(HEAD) in BACKBONES:
            build = backbone
        else:
            build = application
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results[name] = routes_of(build(name))
        except (AttributeError, ImportError) as e:  # not in this keras-hub
            print(f"{name}: skipped ({e})", file=sys.stderr)
    return results


def fused_survey(rows):
    """Per row of `fused_layers.ROWS`: its description, and per fused kernel
    its shape and routing-table rows read whole (no fused declarations), by
    parts, and by parts and heads (`per_head=True`)."""

    def routes(model, kernels, per_head):
        optimizer = keras_muon.Muon(per_head=per_head)
        optimizer.attach(model)
        optimizer.build(model.trainable_variables)
        table = dict(zip(map(id, model.trainable_variables), optimizer.routing_table()))
        return [table[id(kernel)] for kernel in kernels]

    results = {}
    for row in rows:
        description, build = fused_layers.ROWS[row]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Flux's blocks define no build()
            model, kernels = build()
            with FUSED_PROJECTIONS.scoped():  # each declared whole, as users can
                for layer_type, attributes in installed_classes(FUSED).items():
                    for attribute in attributes:
                        keras_muon.register_fused_projection(layer_type, attribute, lambda _: None)
                whole = routes(model, kernels, per_head=False)
            parts = routes(model, kernels, per_head=False)
            heads = routes(model, kernels, per_head=True)
        shapes = [tuple(kernel.shape) for kernel in kernels]
        results[row] = (description, list(zip(shapes, whole, parts, heads)))
    return results


def print_fused(results):
    """A markdown table of `fused_survey`: a kernel's matrices as
    `d_in×d_out ×blocks`, and its parts' names (`q|k|v 16×16 ×3`)."""

    def cell(values):
        return "; ".join(dict.fromkeys(str(v) for v in values)).replace("|", "\\|")

    def matrices(route):
        return report.matrices(route) if route["route"] == "muon" else route["reason"]

    header = ("row", "layer", "kernel shape", "whole (before)", "parts", "parts × heads")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row, (description, kernels) in results.items():
        shapes, whole, parts, heads = zip(*kernels)
        columns = [shapes, map(matrices, whole), map(matrices, parts), map(matrices, heads)]
        print(f"| {row} | {description} | " + " | ".join(map(cell, columns)) + " |")
    by_parts, by_heads = (
        sum(all(kernel[column]["parts"] for kernel in kernels) for _, kernels in results.values())
        for column in (2, 3)
    )
    print(
        f"\nfused kinds read as parts: {by_parts}/{len(results)} "
        f"(per_head=True: {by_heads}/{len(results)})"
    )


def summary_row(name, rows):
    muon = [r for r in rows if r[1] == "muon"]
    return (
        name,
        len(rows),
        len(muon),
        sum(r[3] for r in muon),
        sum("output head" in r[4] for r in rows),
        sum("guessed" in r[4] for r in rows),
    )


def differences(old, new):
    """Per model, the variables whose route, matrix or block count changed,
    matched by position (paths can repeat within a model)."""
    changed = {}
    for name, rows in new.items():
        if name not in old:
            continue
        changed[name] = [
            (before, after) for before, after in zip(old[name], rows) if before[1:4] != after[1:4]
        ]
    return changed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--save", help="write the routes to this JSON file")
    parser.add_argument("--compare", help="a JSON file written by --save")
    backbones = [name + suffix for name in BACKBONES for suffix in ("", HEAD)]
    backbones.remove("SigLIPBackbone" + HEAD)
    parser.add_argument(
        "--models",
        nargs="*",
        default=[*KERAS_HUB, *backbones, *APPLICATIONS],
        help="the models to survey (none: `--models` alone)",
    )
    parser.add_argument(
        "--fused",
        nargs="*",
        choices=list(fused_layers.ROWS),
        help="survey these rows of the fused projections (all: `--fused` alone)",
    )
    args = parser.parse_args(argv)
    # Through JSON, as a saved run is read back (tuples become lists).
    results = json.loads(json.dumps(survey(args.models)))
    if results:
        header = ("model", "variables", "muon", "muon blocks", "head variables", "guessed")
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
    for name, rows in results.items():
        print("| " + " | ".join(str(cell) for cell in summary_row(name, rows)) + " |")
    alone_and_under_a_head = [
        n for n in results if n.endswith(HEAD) and n.removesuffix(HEAD) in results
    ]
    if alone_and_under_a_head:
        print("\nBackbones alone: routes that differ from the same backbone under a head")
        for name in alone_and_under_a_head:
            under_head = {row[0]: row for row in results[name]}
            alone = results[name.removesuffix(HEAD)]
            differ = [row for row in alone if row[1] != under_head[row[0]][1]]
            print(f"{name.removesuffix(HEAD)}: {len(differ)}")
            for row in differ:
                print(
                    f"  {row[0]}: {row[1]} alone ({row[4]}), {under_head[row[0]][1]} under a head"
                )
    if args.save:
        with open(args.save, "w") as f:
            json.dump(results, f)
    if args.compare:
        with open(args.compare) as f:
            old = json.load(f)
        print("\nRoutes that differ from", args.compare)
        for name, changes in differences(old, results).items():
            print(f"{name}: {len(changes)}")
            for before, after in changes:
                print(
                    f"  {after[0]}: {before[1]} {before[2]}×{before[3]} -> "
                    f"{after[1]} {after[2]}×{after[3]} ({after[4]})"
                )
    if args.fused is not None:
        if results:
            print()
        print_fused(fused_survey(args.fused or fused_layers.ROWS))
    return results


if __name__ == "__main__":
    main()
