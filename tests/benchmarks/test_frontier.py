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
