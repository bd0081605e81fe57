"""ACR and certified accuracy count wrong and abstained predictions as radius 0."""

from __future__ import annotations

import csv

import pytest

from reaas_client.metrics import (
    RADII_REPORTED,
    InputRecord,
    average_certified_radius,
    certified_accuracy,
    summarize,
    summary_table_markdown,
    summary_table_text,
    write_records_csv,
)
from reaas_client.plotting import plot_certified_accuracy


def record(label: int, prediction: int, radius: float, queries: int = 2) -> InputRecord:
    return InputRecord(input_id=f"test-{label}-{prediction}", label=label, prediction=prediction,
                       image_radius=radius, feature_radius=2 * radius,
                       queries={"Feature": 1, "F2IPerturb": queries - 1}, bytes_up=100, bytes_down=20,
                       wall_s=0.5)


RECORDS = [
    record(0, 0, 0.4),   # correct: counts 0.4
    record(1, 2, 0.9),   # wrong with a large radius: counts 0
    record(2, -1, 0.7),  # abstained (a pipeline bug could leave a radius): counts 0
    record(3, 3, 0.0),   # correct, radius 0: accurate at r = 0 only
]


def test_acr_counts_wrong_and_abstained_as_zero() -> None:
    assert average_certified_radius(RECORDS) == pytest.approx(0.4 / 4)


def test_certified_accuracy_counts_wrong_and_abstained_as_zero() -> None:
    assert certified_accuracy(RECORDS, 0.0) == pytest.approx(2 / 4)
    assert certified_accuracy(RECORDS, 0.25) == pytest.approx(1 / 4)
    assert certified_accuracy(RECORDS, 0.5) == 0.0


def test_summary_and_table() -> None:
    summary = summarize(RECORDS, service="REaaS-BC", dataset="toy", queries_per_train_input=1, wall_s=2.0)
    assert summary.queries_per_test_input == 2
    assert summary.bytes_per_test_input == 120
    assert set(summary.certified_accuracy) == set(RADII_REPORTED)
    table = summary_table_markdown([summary])
    assert "| REaaS-BC | toy | 4 | 0.100 | 0.500 |" in table


def test_records_csv_and_plot(tmp_path) -> None:
    write_records_csv(RECORDS, tmp_path / "r.csv")
    with (tmp_path / "r.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["certified_radius"]) for r in rows] == [0.4, 0.0, 0.0, 0.0]
    assert rows[0]["queries_F2IPerturb"] == "1"
    png = plot_certified_accuracy({"a": RECORDS}, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_terminal_table_fits_100_columns_and_keeps_every_row_and_note() -> None:
    long_note = "first 50 of the 100 test inputs (each costs n0 + N queries); " * 3
    summaries = [summarize(RECORDS, service=service, dataset="rt-embedded", queries_per_train_input=25,
                           wall_s=1234.5, train_wall_s=99.0, note=long_note if service == "SEaaS-SC" else "")
                 for service in ("REaaS-BC", "REaaS-SC", "SEaaS-SC")]
    text = summary_table_text(summaries)
    assert max(len(line) for line in text.splitlines()) <= 100
    assert [line.split()[0] for line in text.splitlines()[2:5]] == ["REaaS-BC", "REaaS-SC", "SEaaS-SC"]
    assert "SEaaS-SC: first 50 of the 100 test inputs" in text
    assert len(summary_table_markdown(summaries).splitlines()[0]) > 100  # the full record stays in summary.md

