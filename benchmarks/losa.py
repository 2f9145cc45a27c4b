"""LoSA against LoRA and full fine-tuning (``lorex bench losa``); see docs/losa.md.

Usage: python benchmarks/losa.py --out benchmarks/results/losa [--quick]
"""

import sys

from lorex.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "losa", *sys.argv[1:]]))
