"""``python -m constitutional.cli …`` is ``cai …``."""

import sys

from constitutional.cli import main

sys.exit(main())
