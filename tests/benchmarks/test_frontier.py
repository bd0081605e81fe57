"""bench-frontier's matched-accuracy verdict: a REaaS point counts only when it is at least as accurate."""

from __future__ import annotations

import argparse

from benchmarks.frontier import FrontierPoint, build_parser, matched_accuracy, plot_frontier


def _point(path: str, accuracy: float, acr: float, knob: str = "k") -> FrontierPoint:
    return FrontierPoint(path, "enc", knob, accuracy, acr, 2.0, 1.0)


def test_help_explains_every_flag() -> None:
    for action in build_parser()._actions:
        if not isinstance(action, argparse._HelpAction):
            assert action.help and len(action.help) > 10, f"{action.option_strings} has no help"


def test_a_larger_acr_at_lower_accuracy_does_not_count() -> None:
    points = [_point("SEaaS-SC", 0.61, 0.127), _point("REaaS-BC", 0.59, 0.20), _point("REaaS-BC", 0.63, 0.10)]
    table, met = matched_accuracy(points, majority=0.5)
    assert not met
    assert "0.100" in table and "**no**" in table


def test_met_when_an_as_accurate_reaas_point_certifies_more() -> None:
    points = [_point("SEaaS-SC", 0.61, 0.127), _point("REaaS-BC", 0.61, 0.13), _point("REaaS-SC", 0.70, 0.01)]
    table, met = matched_accuracy(points, majority=0.5)
    assert met
    assert "0.130" in table


def test_seaas_points_at_or_below_the_majority_class_are_not_targets() -> None:
    points = [_point("SEaaS-SC", 0.47, 0.277), _point("SEaaS-SC", 0.61, 0.127), _point("REaaS-BC", 0.62, 0.13)]
    table, met = matched_accuracy(points, majority=0.5)
    assert met
    assert "0.277" not in table


def test_no_seaas_point_above_the_majority_is_not_a_win() -> None:
    _, met = matched_accuracy([_point("SEaaS-SC", 0.5, 0.3), _point("REaaS-BC", 0.9, 0.5)], majority=0.5)
    assert not met


def test_plot_is_written(tmp_path) -> None:
    points = [_point("SEaaS-SC", 0.6, 0.1, "sigma 0.5"), _point("REaaS-BC", 0.62, 0.12, "eps 0")]
    path = plot_frontier(points, 0.5, tmp_path / "f.png", "t")
    assert path.stat().st_size > 1000


def test_points_go_through_the_service_at_each_paths_query_cost(tmp_path, monkeypatch) -> None:
    from benchmarks import frontier
    from benchmarks.certify_rows import Data, Encoder
    from reaas_client.downstream import TrainConfig, stratified_subset
    from robust_pretrain import load_embedded_mnist

    monkeypatch.setattr(frontier, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(frontier, "LOG_DIR", tmp_path)
    splits = load_embedded_mnist()
    train, test = splits.downstream_train, splits.downstream_test
    train_idx, test_idx = stratified_subset(train.labels, 100), stratified_subset(test.labels, 0)
    data = Data("mnist-embedded", train.images[train_idx], train.labels[train_idx], test.images[test_idx],
                test.labels[test_idx], 10, test_size=6)
    head = TrainConfig(epochs=3, hidden=(32, 32), head="linear")
    heads = frontier.Heads(margin=head, reaas_sc=head, seaas_sc=TrainConfig(epochs=3, hidden=(32, 32)))
    pca = Encoder("pca", kind="pca")
    points = frontier.reaas_points(pca, data, heads, (0.0, 0.1), (0.1,), 100, started=0.0)
    points += frontier.seaas_points(pca, data, heads, (0.5,), 50, started=0.0)
    assert [p.path for p in points] == ["REaaS-BC", "REaaS-BC", "REaaS-SC", "SEaaS-SC"]
    assert [p.queries_per_test_input for p in points] == [2, 2, 2, 150]
    assert all(0 <= p.clean_accuracy <= 1 and p.acr >= 0 for p in points)
