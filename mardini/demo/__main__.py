"""``python -m mardini.demo``: see :mod:`mardini.demo.main`."""

import os
import sys

# Before torch loads OpenMP: waiting threads sleep instead of spinning. With 2 threads on 2 cores this costs a little
# on an idle machine and avoids a several-fold slow-down when another process holds a core.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from mardini.demo.main import main  # noqa: E402

sys.exit(main())
