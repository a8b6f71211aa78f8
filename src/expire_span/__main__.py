"""``python -m expire_span`` is the ``expire-span`` command (also under torchrun)."""

import sys

from expire_span.cli import main

sys.exit(main())
