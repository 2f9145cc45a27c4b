import sys

from lorex.cli import main

sys.exit(main())
