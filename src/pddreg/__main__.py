"""``python -m pddreg`` runs the command line."""

import sys

from pddreg.cli import main

sys.exit(main())
