"""Source-free cross-modal transfer on the built-in RGB -> depth and RGB -> NIR tasks
(``lorex bench cross-modal``); see docs/cross_modal.md.

Usage: python benchmarks/cross_modal.py --out benchmarks/results/cross_modal [--quick]
"""

import sys

from lorex.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "cross-modal", *sys.argv[1:]]))
