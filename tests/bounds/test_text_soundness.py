"""Every F2I bound the service offers is sound on text encoders: no random or PGD perturbation of the embedding
matrix inside the certified radius moves the features by R_F, and the recorded global bound is never beaten.

Perturbations are l2 in the embedding matrix [embed_dim, 1, max_length] (the threat model of text_input).
Runs on the shipped text demo encoders and on a tiny seeded one; a single violation is a bug."""

from __future__ import annotations

import copy

import pytest
import torch

from bounds import BOUNDS_OFFERED, f2i_radius, global_lipschitz_upper, pgd_feature_distance
from robust_pretrain.architectures import EncoderConfig, build_encoder
from robust_pretrain.checkpoint import LoadedEncoder, describe_encoder, encoder_weights_bytes, serving_model
from robust_pretrain.demo import TEXT_DEMO_KINDS, load_demo_encoder
from robust_pretrain.text_encoders import fit_text_bag_features
from robust_pretrain.text_input import TextInput, Vocabulary

REVIEWS = ["a fine , moving film", "dull , long and badly acted", "the plot makes no sense at all", "loved it"]


def _tiny(arch: str) -> LoadedEncoder:
    generator = torch.Generator().manual_seed(7)
    tokens = ("<pad>", "<unk>", "a", "fine", ",", "film", "dull", "long", "plot", "the", "it")
    embedding = torch.nn.functional.normalize(torch.randn(len(tokens), 6, generator=generator), dim=1)
    embedding[0] = 0
    text = TextInput(Vocabulary(tokens, 8), embedding)
    if arch == "text_bag_features":
        config = EncoderConfig(arch=arch, input_shape=text.input_shape, widths=(8,), feature_dim=8)
        model = fit_text_bag_features(text.input_shape, 8, seed=7)
    else:
        config = EncoderConfig(arch=arch, input_shape=text.input_shape, widths=(8, 8), feature_dim=4)
        torch.manual_seed(7)
        model = build_encoder(config)
    metadata = describe_encoder(model, config, encoder_weights_bytes(model, text), model_id="tiny", description="",
                                training={}, text=text)
    return LoadedEncoder(serving_model(model), metadata, text)


ENCODERS = {f"tiny-{arch}": (lambda arch=arch: _tiny(arch)) for arch in ("text_lipschitz_conv", "text_cnn",
                                                                             "text_bag_features")}
ENCODERS.update({kind: (lambda kind=kind: load_demo_encoder(kind)) for kind in TEXT_DEMO_KINDS})


def _matrices(encoder: LoadedEncoder) -> torch.Tensor:
    return encoder.text.embed(encoder.text.vocabulary.encode(REVIEWS))


def _exact_distance(model, matrices, delta) -> torch.Tensor:
    """||f(x + d) - f(x)|| in float64: the bound is about the function, not float32 rounding."""
    exact = copy.deepcopy(model).double()
    with torch.no_grad():
        return (exact(matrices.double() + delta.double()) - exact(matrices.double())).flatten(1).norm(dim=1)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_recorded_global_bound_recomputes_and_no_attack_beats_it(name):
    encoder = ENCODERS[name]()
    shape = tuple(encoder.metadata.input_shape)
    bound = encoder.metadata.lipschitz_upper
    assert global_lipschitz_upper(encoder.model, shape) == pytest.approx(bound, rel=1e-6)
    matrices = _matrices(encoder)
    generator = torch.Generator().manual_seed(3)
    for radius in (0.1, 1.0, 4.0):
        radii = torch.full((len(REVIEWS),), radius)
        _, delta = pgd_feature_distance(encoder.model, matrices, radii, steps=40, restarts=2, generator=generator)
        assert bool((delta.flatten(1).norm(dim=1) <= radius * (1 + 1e-6)).all())
        assert float(_exact_distance(encoder.model, matrices, delta).max()) / radius <= bound
        noise = torch.randn((16, *matrices.shape), generator=generator)
        noise = noise * radius / noise.flatten(2).norm(dim=2)[..., None, None, None]
        for sample in noise:
            assert float(_exact_distance(encoder.model, matrices, sample).max()) / radius <= bound


@pytest.mark.parametrize("bound", BOUNDS_OFFERED)
@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_every_offered_bound_survives_random_and_pgd_perturbations(name, bound):
    encoder = ENCODERS[name]()
    matrices = _matrices(encoder)[:2]
    feature_radii = torch.tensor([0.02, 0.2])
    result = f2i_radius(encoder.model, matrices, feature_radii, bound=bound, tolerance=1e-2,
                        lipschitz_upper=encoder.metadata.lipschitz_upper)
    radius = result.image_radius.float()
    assert bool((radius > 0).all())
    generator = torch.Generator().manual_seed(4)
    attacked, _ = pgd_feature_distance(encoder.model, matrices, radius, steps=40, restarts=2, generator=generator)
    assert bool((attacked < feature_radii).all()), (name, bound, attacked, feature_radii)
    noise = torch.randn((16, *matrices.shape), generator=generator)
    noise = noise * radius[:, None, None, None] / noise.flatten(2).norm(dim=2)[..., None, None, None]
    for sample in noise:
        assert bool((_exact_distance(encoder.model, matrices, sample) < feature_radii.double()).all())
