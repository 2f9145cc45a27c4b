"""SAGE-reID leave-one-domain-out on the synthetic re-ID domains, plus the digit domains
(``lorex bench sage``); see docs/sage.md.

Usage: python benchmarks/sage.py --out benchmarks/results/sage [--quick]
"""

import sys

from lorex.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "sage", *sys.argv[1:]]))
