"""F2IPerturb over the wire: radii the server returns are verified by the bound it names."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from bounds import f2i_radius
from reaas_client import ServiceError


def test_lipschitz_radius_is_verified_and_grows_with_feature_radius(client, make_images):
    images = make_images(3).repeat(3, 1, 1, 1)
    feature_radii = np.repeat([0.1, 0.5, 1.0], 3)
    reply = client.f2i_perturb(images, feature_radii, bound="lipschitz")
    lipschitz = client.info().lipschitz_upper
    assert reply.bound == ("lipschitz",) * 9
    assert np.all(reply.image_radius > 0)
    assert np.all(lipschitz * reply.image_radius < feature_radii)  # verified: L * R < R_F
    per_radius = reply.image_radius.reshape(3, 3)
    assert np.all(np.diff(per_radius, axis=0) > 0)  # larger R_F, larger R
    assert np.all(reply.search_steps >= 0)  # the Lipschitz bound may be solved in closed form


def test_default_bound_is_never_looser_than_lipschitz(client, make_images):
    images = make_images(2, seed=3)
    radii = np.full(2, 0.5)
    client.timeout_s = 600  # the default may search with local bounds (not on the affine PCA default): slow on a busy CPU
    best = client.f2i_perturb(images, radii)
    lipschitz = client.f2i_perturb(images, radii, bound="lipschitz")
    assert set(best.bound) <= set(client.info().bounds_offered)
    assert np.all(best.image_radius >= lipschitz.image_radius * (1 - 1e-6))


def test_zero_feature_radius_certifies_nothing(client, make_images):
    reply = client.f2i_perturb(make_images(2), [0.0, 0.0], bound="lipschitz")
    assert np.all(reply.image_radius == 0)


def test_seaas_deployment_refuses_f2i_with_unimplemented(seaas_address, make_images):
    from reaas_client import EncoderClient

    with EncoderClient(seaas_address) as seaas:
        info = seaas.info()
        assert info.mode == "seaas" and not info.f2i_perturb_offered and info.bounds_offered == ()
        assert seaas.features(make_images(2)).shape[0] == 2
        with pytest.raises(ServiceError) as raised:
            seaas.f2i_perturb(make_images(2), [0.5, 0.5])
    assert raised.value.code.name == "UNIMPLEMENTED"
    assert "SEaaS" in raised.value.details


def test_streaming_f2i_equals_unary(raw_stub, client, make_images):
    from reaas.v1 import encoder_service_pb2 as pb
    from reaas_client import encode_tensor

    batches = [make_images(2, seed=s).numpy() for s in range(3)]
    requests = [
        pb.F2IPerturbRequest(images=encode_tensor(b), feature_radii=[0.3, 0.6], bound="ibp") for b in batches
    ]
    streamed = list(raw_stub.StreamF2IPerturb(iter(requests), timeout=300))
    assert len(streamed) == 3
    for batch, reply in zip(batches, streamed, strict=True):
        unary = client.f2i_perturb(batch, [0.3, 0.6], bound="ibp")
        # The same search on the same images, but the float32 bound may round differently from call to call, and
        # the search promises only a verified radius within its relative tolerance of where verification stops.
        # On an affine encoder (the PCA default) IBP is linear in r, so regula falsi probes the crossing itself,
        # whose score is 1 +- 1e-8: one call verifies it, another rejects it and ends at 0.9999 of it. Both are
        # sound; they agree to the tolerance, not to float32 rounding.
        tolerance = inspect.signature(f2i_radius).parameters["tolerance"].default
        np.testing.assert_allclose([r.image_radius for r in reply.radii], unary.image_radius, rtol=tolerance)
        assert all(r.bound == "ibp" for r in reply.radii)


def test_encoder_info_lists_each_bound_with_its_cost_and_the_auto_default(client):
    info = client.info()
    assert info.default_bound == "auto"
    assert tuple(c.name for c in info.bound_costs) == info.bounds_offered
    costs = {c.name: c for c in info.bound_costs}
    assert costs["lipschitz"].closed_form and not costs["auto"].closed_form
    assert all(c.description for c in info.bound_costs)
    # the cheapest bounds are measured first, so the closed form and the auto test always get a number
    assert costs["lipschitz"].seconds_per_image is not None and costs["auto"].seconds_per_image is not None
    assert all(c.seconds_per_image is None or c.seconds_per_image >= 0 for c in info.bound_costs)


def test_encoder_info_with_no_cost_budget_reports_costs_unmeasured(demo_encoder):
    from reaas_client import EncoderClient
    from reaas_server import ServerConfig, run_server

    config = ServerConfig(port=0, mode="reaas", bound_cost_budget_s=0.0)
    with run_server(config, demo_encoder) as (_, port), EncoderClient(f"127.0.0.1:{port}") as fresh:
        info = fresh.info()
    assert [c.seconds_per_image for c in info.bound_costs] == [None] * len(info.bounds_offered)


def test_feature_radii_given_as_a_python_list_travel_in_float64(client, make_images):
    """The wire carries R_F as double; the client must not round a list to float32 on the way (about 1e-8 off)."""
    import torch

    from bounds.f2i import closed_form_radius

    radii = [0.1, 0.7]
    reply = client.f2i_perturb(make_images(2), radii, bound="lipschitz")
    expected = closed_form_radius(torch.tensor(radii, dtype=torch.float64), client.info().lipschitz_upper)
    assert reply.image_radius.tolist() == expected.tolist()


def test_concurrent_default_bound_searches_on_a_non_affine_encoder_all_answer():
    """Concurrent F2I calls each run their own search in a server thread (batching off); on a ReLU CNN the default
    bound's decision runs forward-mode AD, whose process-global state once made such calls fail with INTERNAL."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from reaas_client import EncoderClient
    from reaas_server import ServedEncoder, ServerConfig, start_server

    encoder = ServedEncoder.load(None, "cpu", demo_kind="nonrobust")
    running = start_server(ServerConfig(port=0, bound_cost_budget_s=0.0, batch_max_images=0, max_f2i_calls=6,
                                        max_calls_per_key=6, workers=24), encoder)
    try:
        images = [torch.rand((2, *encoder.metadata.input_shape), generator=torch.Generator().manual_seed(s))
                  for s in range(6)]
        with EncoderClient(f"127.0.0.1:{running.port}", timeout_s=300) as client, ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(lambda batch: client.f2i_perturb(batch, [0.5, 0.5]), images))
            closed_form = client.f2i_perturb(images[0], [0.5, 0.5], bound="lipschitz").image_radius
        for reply in replies:
            assert np.all(reply.image_radius >= closed_form * (1 - 1e-6))  # auto is never looser than Lipschitz
    finally:
        running.stop(grace_s=0)


def test_feature_radii_beyond_the_stated_limit_are_refused_naming_the_range(raw_stub, client, make_images):
    """R_F above lipschitz_upper x the input box's diameter certifies nothing more: INVALID_ARGUMENT naming the
    range (a crafted 1e308 once reached the bounds), while the limit itself is answered."""
    import math

    import grpc

    from reaas.v1 import encoder_service_pb2 as pb
    from reaas_client.wire import encode_tensor

    info = client.info()
    diameter = math.sqrt(math.prod(info.input_shape)) * (info.value_max - info.value_min)
    limit = info.max_feature_radius
    assert limit == pytest.approx(info.lipschitz_upper * diameter, rel=1e-6)
    images = encode_tensor(make_images(1).numpy())
    for radius in (limit * (1 + 1e-9), 1e308, float("inf"), float("nan"), -1e-300):
        with pytest.raises(grpc.RpcError) as refused:
            raw_stub.F2IPerturb(pb.F2IPerturbRequest(images=images, feature_radii=[radius]), timeout=60)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, radius
        assert "max_feature_radius" in refused.value.details() and f"{limit:.6g}" in refused.value.details()
    at_limit = raw_stub.F2IPerturb(pb.F2IPerturbRequest(images=images, feature_radii=[limit]), timeout=60)
    assert at_limit.radii[0].image_radius > 0


def test_the_client_sends_at_most_the_limit_and_the_answer_stays_sound(client, make_images):
    images = make_images(2, seed=5)
    limit = client.info().max_feature_radius
    clamped = client.f2i_perturb(images, [limit * 10, 1e300], bound="lipschitz")
    at_limit = client.f2i_perturb(images, [limit, limit], bound="lipschitz")
    # the radius of the limit: sound for any larger R_F too (a larger R_F never allows a smaller R)
    assert np.array_equal(clamped.image_radius, at_limit.image_radius)
    assert np.all(client.info().lipschitz_upper * at_limit.image_radius < limit)
