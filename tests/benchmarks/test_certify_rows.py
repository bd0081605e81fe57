"""bench-certify's row builder on a tiny setting: shared inputs, 2 queries per REaaS input, attack bounds BC."""

from __future__ import annotations

import argparse
import time

import pytest

from benchmarks import certify_report
from benchmarks.attack_radius import AttackConfig
from benchmarks.certify import build_parser
from benchmarks.certify_rows import Data, Encoder, Settings, reaas_rows
from reaas_client.downstream import TrainConfig, stratified_subset
from reaas_client.head_selection import HeadSearch
from robust_pretrain import load_embedded_mnist


def test_help_explains_every_flag() -> None:
    for action in build_parser()._actions:
        if not isinstance(action, argparse._HelpAction):
            assert action.help and len(action.help) > 10, f"{action.option_strings} has no help"


@pytest.fixture(scope="module")
def pca_report(tmp_path_factory):
    splits = load_embedded_mnist()
    train, test = splits.downstream_train, splits.downstream_test
    train_idx, test_idx = stratified_subset(train.labels, 100), stratified_subset(test.labels, 0)
    data = Data("mnist-embedded", train.images[train_idx], train.labels[train_idx], test.images[test_idx],
                test.labels[test_idx], 10, test_size=6)
    folder = tmp_path_factory.mktemp("bench")
    settings = Settings(feature_n=300, grid_n=100, holdout=30, feature_sigma_fractions=(0.1,),
                        search=HeadSearch(heads=("linear",), margins=(1.0,)), all_test_encoders=("pca",),
                        margin_train=TrainConfig(epochs=3, hidden=(32, 32)), attack=AttackConfig(search_steps=8, steps=20, restarts=1),
                        cache_dir=folder / "cache", log_dir=folder)
    return data, reaas_rows(Encoder("pca", kind="pca"), data, settings, time.perf_counter())


def test_every_row_is_on_the_same_inputs_with_two_queries_each(pca_report) -> None:
    data, report = pca_report
    bc, sc = report.rows
    assert [s.service for s in (bc.summary, sc.summary)] == ["REaaS-BC", "REaaS-SC"]
    for row in report.rows:
        records = row.result.records[: row.summary.num_test]
        assert row.summary.num_test == data.test_size == len(row.attack)
        assert [r.label for r in records] == data.test_labels[: data.test_size].tolist()
        assert all(r.queries == {"Feature": 1, "F2IPerturb": 1} for r in records)
    assert report.bc_all is not None and report.bc_all.num_test == len(data.test_images)  # all 1 000


def test_attack_bounds_every_bc_certificate_and_is_zero_where_wrong(pca_report) -> None:
    _, report = pca_report
    bc = report.rows[0]
    for record, attack in zip(bc.result.records, bc.attack.tolist(), strict=False):
        assert record.certified_radius <= attack + 1e-9
        assert (attack == 0.0) == (not record.correct)
    assert "pca 0." in certify_report.soundness_line(report.rows, AttackConfig().max_radius)
