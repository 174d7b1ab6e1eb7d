"""Fixed histogram bins of gradient magnitudes, shared by measurement and reporters."""

from __future__ import annotations

import numpy as np

#: Fixed, log-spaced edges of gradient-magnitude histograms: 1e-12 ... 1e4, four bins a decade.
HISTOGRAM_EDGES = np.logspace(-12, 4, 65)
#: Bins: [below 1e-12 (zeros too), 64 log-spaced bins, at or above 1e4, NaN/Inf]
HISTOGRAM_BINS = len(HISTOGRAM_EDGES) + 2
