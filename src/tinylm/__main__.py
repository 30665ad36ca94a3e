"""`python -m tinylm` is the `tinylm` command."""

import sys

from .cli import main

sys.exit(main())
