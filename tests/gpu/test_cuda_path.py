"""The CUDA path agrees with the CPU path: features to float32 rounding, F2I radii never above the CPU's by more
than the search tolerance and never undercut by an attack, and a server on `cuda` answering Feature and
F2IPerturb. Marked `gpu` and skipped, with the reason, where CUDA is absent (so `make test` shows them skipped on
a CPU machine and runs them on a GPU one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bounds import build_graph, pgd_feature_distance
from bounds.operators import Box
from bounds.slope_ascent import slope_ascent_lower
from reaas_client import EncoderClient, SmoothingConfig, certify_features
from reaas_server import ServedEncoder, ServerConfig, run_server
from robust_pretrain import load_embedded_mnist

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs CUDA: torch.cuda.is_available() is False on this machine"),
]
KINDS = ("spectral", "lipschitz")  # the paper's ReLU CNN (cuDNN convolutions) and the MaxMin MLP
BOUNDS = ("auto", "best_ibp", "crown", "local_lipschitz")
FEATURE_RADIUS = 0.5
SEARCH_TOLERANCE = 1e-3  # f2i_radius's default relative tolerance


def _digits(count: int) -> torch.Tensor:
    return load_embedded_mnist().downstream_test.images[:count]


@pytest.fixture(scope="module", params=KINDS)
def encoders(request) -> tuple[ServedEncoder, ServedEncoder]:
    """The same demo encoder served on the CPU and on CUDA."""
    return (ServedEncoder.load(None, "cpu", demo_kind=request.param),
            ServedEncoder.load(None, "cuda", demo_kind=request.param))


def test_cuda_features_equal_cpu_features(encoders):
    cpu, cuda = encoders
    images = _digits(100)
    expected = cpu.features(images)
    got = cuda.features(images, chunk_size=24)  # uneven chunks: five forward passes queued, one copy back
    assert got.device.type == "cpu" and got.dtype == torch.float32 and got.shape == expected.shape
    # IEEE float32 on both sides (TF32 off), only the summation order differs: ~1e-6 relative per layer
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("bound", BOUNDS)
def test_cuda_image_radii_are_sound(encoders, bound):
    cpu, cuda = encoders
    images, radii = _digits(4), torch.full((4,), FEATURE_RADIUS)
    settings = dict(bound=bound, chunk_size=2, memory_budget_bytes=256 << 20)  # two chunks per call
    on_cpu = cpu.image_radii(images, radii, **settings)
    on_cuda = cuda.image_radii(images, radii, **settings)
    assert on_cuda.image_radius.device.type == "cpu" and on_cuda.image_radius.dtype == torch.float64
    assert bool((on_cuda.image_radius > 0).all())
    # two searches whose bounds differ by rounding may stop at different probes, never more than a tolerance apart
    assert bool((on_cuda.image_radius <= on_cpu.image_radius * (1 + 2 * SEARCH_TOLERANCE)).all()), \
        (on_cuda.image_radius, on_cpu.image_radius)
    distance, _ = pgd_feature_distance(cuda.model, images.cuda(), on_cuda.image_radius.float().cuda(), steps=100,
                                       restarts=5, generator=torch.Generator().manual_seed(4))
    assert bool((distance.cpu() < FEATURE_RADIUS).all()), (bound, distance.max())


def test_cuda_slope_ascent_matches_the_cpu():
    """The lower bound every Jacobian-relaxation bound is tested against runs on CUDA with the CPU's draws."""
    cpu = ServedEncoder.load(None, "cpu", demo_kind="spectral")
    shape = tuple(cpu.metadata.input_shape)
    images = _digits(4)
    values = []
    for device in ("cpu", "cuda"):
        graph = build_graph(cpu.model, shape, device=device)  # the graph holds its own copies of the weights
        everywhere = [Box(torch.full((4, *n.shape), -1.0, device=device), torch.full((4, *n.shape), 1.0, device=device))
                      for n in graph.nodes]
        values.append(slope_ascent_lower(graph, images.to(device), everywhere, restarts=2, iterations=10).cpu())
    torch.testing.assert_close(values[1], values[0], rtol=1e-4, atol=1e-6)
    assert float(values[1].max()) <= cpu.metadata.lipschitz_upper


def test_a_server_on_cuda_answers_feature_and_f2i():
    """`reaas-server --device cuda` (config.device) serves the encoder on the GPU and says so."""
    config = ServerConfig(port=0, mode="reaas", demo_kind="spectral", device="cuda", max_batch_size=64)
    reference = ServedEncoder.load(None, "cpu", demo_kind="spectral")
    images = _digits(10)
    with run_server(config) as (_, port), EncoderClient(f"127.0.0.1:{port}", timeout_s=120) as client:
        assert client.info().device.startswith("cuda")
        np.testing.assert_allclose(client.features(images), reference.features(images).numpy(), rtol=1e-4,
                                   atol=1e-5)
        reply = client.f2i_perturb(images, [FEATURE_RADIUS] * 10, bound="auto")
        assert len(reply.image_radius) == 10 and all(r > 0 for r in reply.image_radius)


def test_a_text_server_on_cuda_embeds_token_ids_on_the_device_and_agrees_with_the_cpu():
    """Token ids are embedded on the serving device (TextInput.embed) and go down the image path there."""
    from robust_pretrain.demo import DEFAULT_TEXT_DEMO_KIND
    from robust_pretrain.text_data import DEMO_REVIEW_SPLIT, load_rotten_tomatoes, split_text_set

    config = ServerConfig(port=0, mode="reaas", demo_kind=DEFAULT_TEXT_DEMO_KIND, device="cuda", max_batch_size=64)
    reference = ServedEncoder.load(None, "cpu", demo_kind=DEFAULT_TEXT_DEMO_KIND)
    _, test = split_text_set(load_rotten_tomatoes(), DEMO_REVIEW_SPLIT)
    ids = reference.text.vocabulary.encode(test.texts[:10])
    with run_server(config) as (_, port), EncoderClient(f"127.0.0.1:{port}", timeout_s=120) as client:
        assert client.info().device.startswith("cuda") and client.info().modality == "text"
        expected = reference.features(reference.text.embed(ids)).numpy()
        np.testing.assert_allclose(client.features(token_ids=ids), expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(client.embed(ids).numpy(), reference.text.embed(ids).numpy())
        reply = client.f2i_perturb(token_ids=ids, feature_radii=[0.05] * 10, bound="auto")
        assert all(r > 0 for r in reply.image_radius)


def test_feature_space_smoothing_on_cuda_certifies_no_more_than_the_exact_radius():
    """REaaS-SC noise drawn on the GPU (SmoothingConfig.device): a two-class linear h, whose smoothed classifier is h
    itself, is certified below its hyperplane distance and close to it at N = 10^5; the caller's h stays on the CPU."""
    torch.manual_seed(0)
    weight, z = torch.randn(8), torch.randn(8)
    distance = 0.3
    h = torch.nn.Linear(8, 2)
    with torch.no_grad():
        h.weight.copy_(torch.stack([torch.zeros(8), weight]))
        h.bias.copy_(torch.tensor([0.0, distance * float(weight.norm()) - float(weight @ z)]))
    (certificate,) = certify_features(h, z[None], SmoothingConfig(0.5, n=100_000, device="cuda"))
    assert next(h.parameters()).device.type == "cpu"
    assert certificate.prediction == 1
    assert 0.9 * distance < certificate.radius <= distance
