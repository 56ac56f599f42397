"""Generate text: `python infer/generate.py --prompt "..." [--method NAME] ...` (same as `spec-jax generate`)."""

import sys

from spec_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
