"""Self-distillation data for draft heads: `python train/make_data.py --config configs/data_smollm2.yaml --out DIR`.

The target answers prompts (from `--prompts FILE`, or written by itself) in batches and the samples go to a
sharded tensorstore folder with a manifest (`spec_jax.training.data`). Run the same command again after an
interruption and it resumes where it stopped. Bad flags or config keys are one line on stderr and exit 2;
Ctrl-C / SIGTERM end with one line and exit 130 / 143.
"""

import argparse
import sys

from spec_jax.cli import load_config
from spec_jax.interrupts import run_command
from spec_jax.training.data import add_data_args, cmd_make_data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="make_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser)

    def body() -> int:
        args = parser.parse_args(argv)
        if args.config:  # YAML defaults (unknown keys refused by name, values range-checked); flags win
            parser.set_defaults(**load_config(args.config, parser))
            args = parser.parse_args(argv)
        return cmd_make_data(args)

    try:
        return run_command(body, prog="make_data")
    except SystemExit as e:  # argparse's usage errors (printed already) and --help
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2


if __name__ == "__main__":
    sys.exit(main())
