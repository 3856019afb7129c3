"""``python -m mardini.demo``: see :mod:`mardini.demo.main`."""

import sys

from mardini.demo.main import main

sys.exit(main())
