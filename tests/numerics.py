"""How tests compare two float32 forward passes of the same inputs.

Two computations of one feature vector agree only up to summation order: the batch layout (a dynamic batcher
merges requests, a client splits them), the thread count and the CPU's kernels all change it. On a 16-core Xeon a
batched pass differed from the unbatched one by 2e-6 on a value of 0.107 (relative 2e-5) in a vector of scale 2.8,
which an exact or rtol=1e-5 comparison called a failure. So the tolerance is relative to the vector's scale: a wrong
image, row order or dtype moves features by O(scale) and still fails.
"""

from __future__ import annotations

import numpy as np

FORWARD_RTOL = 1e-4
FORWARD_ATOL_OF_SCALE = 1e-5  # of max |expected|


def assert_same_features(actual, expected) -> None:
    """`actual` equals `expected` (arrays or CPU tensors) up to float32 summation order."""
    expected = np.asarray(expected, dtype=np.float64)
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=FORWARD_RTOL,
                               atol=FORWARD_ATOL_OF_SCALE * max(scale, 1e-12))
