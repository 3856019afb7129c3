"""``python -m mardini.demo``: see :mod:`mardini.demo.main`."""

import os
import sys

# Before torch loads OpenMP: spinning threads on an idle machine, sleeping ones on a busy one (see wait_policy).
from mardini.demo.wait_policy import apply_wait_policy, demo_threads  # noqa: E402  (imports no torch)

os.environ["MARDINI_DEMO_WAIT_POLICY"] = apply_wait_policy(threads=demo_threads(sys.argv[1:]))

from mardini.demo.main import cli  # noqa: E402

sys.exit(cli())
