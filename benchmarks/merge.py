"""Merge the digit-domain experts with every method: `lorex bench merge` as a script.

python benchmarks/merge.py --out benchmarks/results/merge --quick
"""

import sys

from lorex.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "merge", *sys.argv[1:]]))
