"""The text front end: vocabulary round trip, ids and padding, label-free embeddings, views, text bodies."""

from __future__ import annotations

import torch

from bounds import build_graph, global_lipschitz_upper, materialize
from robust_pretrain.architectures import EncoderConfig, build_encoder
from robust_pretrain.text_embeddings import nearest_neighbour_distances, ppmi_svd_embedding
from robust_pretrain.text_encoders import AOLConvRow, fit_text_bag_pca
from robust_pretrain.text_input import TextInput, Vocabulary
from robust_pretrain.text_train import augment_ids

CORPUS = ["the film was good and the cast was good", "the plot was bad and the film was long",
          "a good cast , a bad plot", "the long film had a good plot"] * 5


def test_vocabulary_round_trip_ids_and_padding():
    vocabulary = Vocabulary.build(CORPUS, size=30, max_length=6)
    assert Vocabulary.from_dict(vocabulary.to_dict()) == vocabulary
    ids = vocabulary.encode(["The film, was GOOD", "zebra", ""])
    assert ids.shape == (3, 6) and ids.dtype == torch.int64
    assert ids[0, :4].tolist() == [vocabulary.tokens.index(t) for t in ("the", "film", ",", "was")]
    assert ids[1].tolist() == [Vocabulary.unk_id] + [Vocabulary.pad_id] * 5
    assert ids[2].eq(Vocabulary.pad_id).all()


def test_ppmi_embedding_has_unit_rows_a_zero_pad_row_and_is_deterministic():
    vocabulary = Vocabulary.build(CORPUS, size=12, max_length=8)
    embedding = ppmi_svd_embedding(CORPUS, vocabulary, 4)
    assert embedding.shape == (12, 4) and embedding.dtype == torch.float32
    assert embedding[0].eq(0).all()
    assert torch.allclose(embedding[1:].norm(dim=1), torch.ones(11), atol=1e-5)
    assert torch.equal(embedding, ppmi_svd_embedding(CORPUS, vocabulary, 4))
    distances = nearest_neighbour_distances(embedding)
    assert distances.shape == (11,) and bool((distances >= 0).all()) and bool((distances <= 2 + 1e-5).all())


def test_views_keep_tokens_in_order_and_pad_at_the_end():
    ids = torch.tensor([[5, 6, 7, 8, 9, 0, 0], [3, 0, 0, 0, 0, 0, 0], [0] * 7])
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        view = augment_ids(ids, token_dropout=0.3, min_crop=0.6, generator=generator)
        for row, source in zip(view.tolist(), ids.tolist(), strict=True):
            kept = [t for t in row if t]
            assert row[:len(kept)] == kept and set(kept) <= set(source)
            assert bool(kept) == any(source)
            assert kept == sorted(kept)  # order kept (the sources are increasing)


def test_aol_row_conv_is_one_lipschitz_and_materializes_to_the_same_function():
    layer = AOLConvRow(8, 6)
    with torch.no_grad():
        layer.weight.normal_()
    plain = materialize(torch.nn.Sequential(layer))
    x = torch.randn(3, 8, 1, 10)
    assert torch.allclose(plain(x), layer(x), atol=1e-5)
    assert global_lipschitz_upper(plain, (8, 1, 10)) <= 1 + 1e-5


def test_text_bodies_trace_through_bounds_and_the_floor_has_the_exact_constant():
    shape = (6, 1, 10)
    for arch in ("text_bag_pca", "text_lipschitz_conv", "text_cnn"):
        config = EncoderConfig(arch=arch, input_shape=shape, widths=(8, 8), feature_dim=4)
        model = materialize(build_encoder(config, trainable=True))
        assert model(torch.randn(2, *shape)).shape == (2, 4)
        build_graph(model, shape)
    vocabulary = Vocabulary.build(CORPUS, size=12, max_length=10)
    text = TextInput(vocabulary, ppmi_svd_embedding(CORPUS, vocabulary, 6))
    floor = fit_text_bag_pca(text.embed(vocabulary.encode(CORPUS)), 6)
    assert abs(global_lipschitz_upper(floor, shape) - 10 ** -0.5) < 1e-5
