#!/usr/bin/env python
"""Sample videos from a trained MarDini checkpoint (interpolation, image-to-video, expansion, long video).

Not built yet: the sampling pipeline is issue 5. This command says so and exits non-zero rather than pretend.
"""

import sys

if __name__ == "__main__":
    sys.exit("sample.py: the sampling pipeline is not built yet (tracked as issue 5: MarDiniPipeline and sample.py).")
