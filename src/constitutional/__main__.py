"""``python -m constitutional …`` is ``cai …``; also ``accelerate launch -m constitutional …``."""

import sys

from constitutional.cli import main

sys.exit(main())
