"""An example run over several seeds: the mean ± standard deviation of each
number of its table, per optimizer (or fine-tuning way), and each against
the first under the rule of examples/spread.py (better or worse where
Welch's t-test gives p < 0.01, otherwise within noise).

Each seed changes the initial weights and the batch order (`--seed`); the
other flags go to the example.

    KERAS_BACKEND=jax python examples/seeds.py char_transformer --seeds 5
    KERAS_BACKEND=jax python examples/seeds.py lora_finetune --seeds 5 --steps 150
"""

import argparse
import importlib
import tempfile
from pathlib import Path

import common
import spread

# The numbers compared, by example: {column: lower is better}.
COMPARED = {
    "char_transformer": {"validation loss": True},
    "digits_convnet": {"validation accuracy": False, "validation loss": True},
    "keras_hub_gpt2": {"validation loss": True},
    "lora_finetune": {"validation loss": True, "pretraining text loss": True},
}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("example", choices=list(COMPARED))
    parser.add_argument("--seeds", type=common.positive_int, default=5)
    parser.add_argument(
        "--summary-output",
        default="results",
        help="folder for <example>_seeds.json, every seed's rows (default ./results)",
    )
    args, example_args = parser.parse_known_args(argv)  # the rest: the example's
    output_folder = Path(args.summary_output)
    example = importlib.import_module(args.example)
    per_seed = []
    for seed in range(args.seeds):
        with tempfile.TemporaryDirectory() as output:
            flags = [*example_args, "--seed", str(seed), "--output", output]
            per_seed.append(example.main(flags))
    rows = summary(per_seed, COMPARED[args.example])
    common.print_table(f"{args.example} over {args.seeds} seeds (0 to {args.seeds - 1})", rows)
    common.save_json(output_folder, f"{args.example}_seeds", {"per seed": per_seed, "rows": rows})
    return rows


def summary(per_seed, columns):
    """One row per optimizer (or way): each of `columns` as mean ± sd over
    the seeds, and its verdict against the first row's."""
    key = "optimizer" if "optimizer" in per_seed[0][0] else "way"
    names = [row[key] for row in per_seed[0]]
    values = {(row[key], column): [] for rows in per_seed for row in rows for column in columns}
    for rows in per_seed:
        for row in rows:
            for column in columns:
                values[row[key], column].append(row[column])
    table = []
    for name in names:
        row = {key: name}
        for column, lower_is_better in columns.items():
            row[column] = spread.mean_sd_text(values[name, column], digits=4)
            first = values[names[0], column]
            row[f"{column} vs {names[0]}"] = (
                ""
                if name == names[0]
                else spread.verdict(values[name, column], first, lower_is_better)
            )
        table.append(row)
    return table


if __name__ == "__main__":
    main()
