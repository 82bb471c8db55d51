"""``python -m benchmarks.detectors``: see :mod:`benchmarks.detectors.run`."""

import sys

from benchmarks.detectors.run import main

sys.exit(main())
