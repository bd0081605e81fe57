"""SEaaS-SC's lean sample stream: noisy images rounded to FLOAT16 or UINT8 on the client, after the noise.

The rounding q is part of the base classifier b(z) = h(f(q(clip(z)))), so it must be a fixed function of z
(deterministic, independent of the batch) applied after the noise, and the images the server decodes must be
exactly q(clip(z)). And it must pay: FLOAT16 sends half the pixel bytes of FLOAT32, UINT8 a quarter, while the
default (FLOAT32) stream is the one it always was.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reaas_client.client import EncoderClient
from reaas_client.downstream import TrainConfig
from reaas_client.pipelines import PathConfig, SmoothingConfig, certify_seaas_sc, train_downstream
from reaas_client.seaas import WIRE_DTYPES, StreamedImageSamples, WireRounding, noisy_copies
from reaas_client.wire import encode_tensor
from reaas_server import ServedEncoder, ServerConfig, run_server
from reaas_server.validation import ImageSpec, decode_images

SIGMA, BATCH = 0.5, 64


class RecordingEncoder:
    """The demo encoder, keeping every float32 batch the server decoded and passed to it."""

    def __init__(self) -> None:
        self.served = ServedEncoder.load(None, "cpu")
        self.seen: list[torch.Tensor] = []
        features = self.served.features

        def recording(images: torch.Tensor, **kwargs):
            self.seen.append(images.clone())
            return features(images, **kwargs)

        self.served.features = recording

    def decoded(self) -> torch.Tensor:
        return torch.cat(self.seen)


@pytest.fixture(scope="module")
def recorder() -> RecordingEncoder:
    return RecordingEncoder()


@pytest.fixture(scope="module")
def seaas_address(recorder):
    with run_server(ServerConfig(port=0, mode="seaas", max_batch_size=BATCH), recorder.served) as (_, port):
        yield f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def image(recorder) -> torch.Tensor:
    return torch.rand(recorder.served.metadata.input_shape, generator=torch.Generator().manual_seed(7))


def expected_clipped(image: torch.Tensor, num: int, seed: int, value_range=(0.0, 1.0)) -> torch.Tensor:
    """clip(x + e) as StreamedImageSamples draws it: one noise draw per request of BATCH images."""
    generator = torch.Generator().manual_seed(seed)
    center = image.unsqueeze(0)
    parts = [noisy_copies(center.expand(min(BATCH, num - start), *image.shape), SIGMA, generator, value_range)
             for start in range(0, num, BATCH)]
    return torch.cat(parts)


class FakeClient:
    """Records the batches a sample source sends; answers zero features."""

    def __init__(self) -> None:
        self.sent: list[torch.Tensor] = []

    def stream_features(self, batches, feature_dtype="float32"):
        self.feature_dtype = feature_dtype
        for images, _ in batches:
            self.sent.append(images)
            yield np.zeros((len(images), 4), np.float32)


@pytest.mark.parametrize("dtype", WIRE_DTYPES)
def test_rounding_is_applied_after_the_noise_on_the_client(dtype, image) -> None:
    fake = FakeClient()
    source = StreamedImageSamples(fake, image, "x", SIGMA, BATCH, (0.0, 1.0), dtype)
    assert sum(len(f) for f in source(150, torch.Generator().manual_seed(3))) == 150
    sent = torch.cat(fake.sent)
    clipped = expected_clipped(image, 150, seed=3)
    assert sent.dtype == {"float32": torch.float32, "float16": torch.float16, "uint8": torch.uint8}[dtype]
    assert torch.equal(sent, WireRounding(dtype).encode(clipped))
    # q moves each noisy pixel by at most half a rounding step: the noise was drawn before the rounding.
    half_step = {"float32": 0.0, "float16": 2.0**-12, "uint8": 0.5 / 255}[dtype]
    assert float((WireRounding(dtype).decode(sent) - clipped).abs().max()) <= half_step * (1 + 1e-6)
    if dtype != "float32":
        assert not torch.equal(WireRounding(dtype).decode(sent), clipped)  # it did round something


@pytest.mark.parametrize("dtype", WIRE_DTYPES)
def test_rounding_is_deterministic_and_independent_of_the_batch(dtype) -> None:
    z = torch.randn(300, 1, 8, 8, generator=torch.Generator().manual_seed(1)).mul_(2).clamp_(0, 1)
    q = WireRounding(dtype)
    whole = q(z)
    assert torch.equal(whole, q(z.clone()))
    assert torch.equal(whole, torch.cat([q(z[:1]), q(z[1:77]), q(z[77:])]))


@pytest.mark.parametrize("dtype", WIRE_DTYPES)
def test_server_decodes_exactly_q_of_the_clipped_noisy_images(dtype, recorder, seaas_address, image) -> None:
    recorder.seen.clear()
    with EncoderClient(seaas_address) as client:
        info = client.info()
        source = StreamedImageSamples(client, image, "x", SIGMA, BATCH, (info.value_min, info.value_max), dtype)
        features = torch.cat(list(source(200, torch.Generator().manual_seed(5))))
    q = WireRounding(dtype, (info.value_min, info.value_max))
    expected = q(expected_clipped(image, 200, seed=5, value_range=(info.value_min, info.value_max)))
    assert torch.equal(recorder.decoded(), expected)
    with torch.inference_mode():
        served = recorder.served.model(expected).float()
    if dtype == "float32":
        assert torch.allclose(features, served, atol=1e-5)
    else:  # a lean stream's features travel as float16: the server's features, rounded once
        assert torch.allclose(features, served.half().float(), atol=1e-5, rtol=0)
        assert features.dtype == torch.float32


@pytest.mark.parametrize("value_range", [(0.0, 1.0), (-1.0, 1.0), (0.0, 255.0), (-0.4242, 2.8215)])
@pytest.mark.parametrize("dtype", WIRE_DTYPES)
def test_server_decoder_agrees_with_q_on_any_range(dtype, value_range) -> None:
    """The server's own decoding (validation.decode_images) of what the client sends is q, bit for bit, and
    a FLOAT16 image is never refused as out of range, even where float16 cannot represent the bounds."""
    low, high = value_range
    z = low + (high - low) * torch.randn(64, 1, 6, 6, generator=torch.Generator().manual_seed(2)).mul_(2).add_(0.5)
    clipped = z.clamp(low, high)
    q = WireRounding(dtype, value_range)
    decoded = decode_images(encode_tensor(q.encode(clipped)), ImageSpec((1, 6, 6), low, high, 64))
    assert torch.equal(decoded, q(clipped))


def test_float16_sends_half_the_bytes_of_float32(seaas_address) -> None:
    images = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(5) % 3
    smoothing = SmoothingConfig(sigma=SIGMA, n0=10, n=290, alpha=0.01)
    sent = {}
    with EncoderClient(seaas_address) as client:
        h = train_downstream("seaas-sc", client, images, labels, 3, dataset="toy", sigma=SIGMA,
                             config=TrainConfig(hidden=(16,), epochs=1), cache_dir=None).model
        for dtype in WIRE_DTYPES:
            records = certify_seaas_sc(client, h, images[:2], labels[:2], smoothing, id_prefix=f"t-{dtype}",
                                       wire_dtype=dtype)
            assert all(r.total_queries == 300 for r in records)
            sent[dtype] = [r.bytes_up for r in records]
    pixels = 300 * 28 * 28
    for up32, up16, up8 in zip(sent["float32"], sent["float16"], sent["uint8"], strict=True):
        # Pixels are 4, 2 and 1 bytes; each request adds a few bytes of framing (shape, dtype, lengths).
        assert 4 * pixels < up32 < 4 * pixels * 1.001
        assert up16 <= up32 / 2 * 1.001 and up16 < 2 * pixels * 1.001
        assert up8 <= up32 / 4 * 1.002


def test_default_stream_is_the_float32_one_it_always_was(seaas_address, image) -> None:
    """Default StreamedImageSamples and PathConfig send clip(x + e) as float32, unrounded: the features equal
    those of the same noisy images sent through the unary Feature RPC."""
    assert PathConfig("seaas-sc").seaas_wire_dtype == "float32"
    with EncoderClient(seaas_address) as client:
        source = StreamedImageSamples(client, image, "x", SIGMA, BATCH)
        streamed = torch.cat(list(source(150, torch.Generator().manual_seed(9))))
        reference = client.features(expected_clipped(image, 150, seed=9))
    assert torch.equal(streamed, torch.from_numpy(reference))


def test_unknown_wire_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="wire dtype"):
        WireRounding("bfloat16")
    with pytest.raises(ValueError, match="wire dtype"):
        PathConfig("seaas-sc", seaas_wire_dtype="float64")
