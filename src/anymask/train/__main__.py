"""``python -m anymask.train ...`` (same as ``anymask train``)."""

import sys

from .cli import main

sys.exit(main())
