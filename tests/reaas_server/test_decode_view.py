"""decode_images on the server's hot path: float32 pixels are a view of the request's bytes (decode_tensor's
writable=False, tested in tests/reaas_client/test_wire.py), and torch's warning about such a view stays out of the
server's log."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from reaas.v1 import encoder_service_pb2 as pb
from reaas_client.wire import encode_tensor
from reaas_server.validation import ImageSpec, decode_images

SPEC = ImageSpec((1, 4, 4), 0.0, 1.0, 8)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint8])
def test_images_decode_to_what_was_sent(dtype):
    pixels = np.random.default_rng(0).random((3, 1, 4, 4))
    sent = (pixels * 255).astype(np.uint8) if dtype == np.uint8 else pixels.astype(dtype)
    request = pb.FeatureRequest.FromString(pb.FeatureRequest(images=encode_tensor(sent)).SerializeToString())
    expected = sent.astype(np.float32) / 255 if dtype == np.uint8 else sent.astype(np.float32)
    np.testing.assert_allclose(decode_images(request.images, SPEC).numpy(), expected, rtol=1e-7, atol=0)


def test_a_float32_request_warns_nothing_in_a_fresh_process():
    """torch warns once per process that it cannot mark a tensor read-only; a fresh interpreter with every
    warning an error is the only place that once is sure to be the first."""
    script = (
        "import numpy as np\n"
        "from reaas.v1 import encoder_service_pb2 as pb\n"
        "from reaas_client.wire import encode_tensor\n"
        "from reaas_server.validation import ImageSpec, decode_images\n"
        "images = pb.FeatureRequest(images=encode_tensor(np.zeros((2, 1, 4, 4), np.float32))).images\n"
        "decode_images(images, ImageSpec((1, 4, 4), 0.0, 1.0, 8))\n"
    )
    done = subprocess.run([sys.executable, "-W", "error", "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "not writable" not in done.stderr, done.stderr[-2000:]
