"""Train draft heads from a recipe: `python train/train_heads.py --config configs/medusa_smollm2.yaml`.

The recipe names the data (made by `train/make_data.py`), the heads and the training settings
(`spec_jax.training.recipes`). Run the same command again after an interruption and training resumes
from its latest checkpoint, reaching the parameters an uninterrupted run would. The finished heads go to
the recipe's `out` with their config and metrics; decode with them via `spec-jax generate --method medusa
--heads OUT`. Bad settings are one line on stderr and exit 2; Ctrl-C / SIGTERM end with one line and exit
130 / 143.
"""

import argparse
import sys

from spec_jax.interrupts import run_command


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="train_heads", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a recipe YAML file (configs/medusa_smollm2.yaml)")

    def body() -> int:
        from spec_jax.training.recipes import load_recipe, run_recipe, summary_line

        args = parser.parse_args(argv)
        recipe = load_recipe(args.config)
        metrics = run_recipe(recipe)
        print(summary_line(metrics))
        print(f"heads saved to {recipe.out}", file=sys.stderr)
        return 0

    try:
        return run_command(body, prog="train_heads")
    except SystemExit as e:  # argparse's usage errors, printed already
        return e.code if isinstance(e.code, int) else 2


if __name__ == "__main__":
    sys.exit(main())
