"""Per-input certification records and the run-level numbers the paper reports (ACR, certified accuracy).

Convention (the paper's, and Cohen et al.'s): a wrong or abstained prediction counts as certified radius 0
and is never certified-accurate, whatever radius the pipeline computed for it.
"""

from __future__ import annotations

import csv
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

RADII_REPORTED: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 1.0)
"""Image-space l2 radii at which certified accuracy is tabulated."""


@dataclass(frozen=True)
class InputRecord:
    """What certifying one test input produced and cost.

    `prediction` is -1 when the pipeline abstained; `image_radius` R and `feature_radius` R_F are what the
    pipeline certified for `prediction` (before the wrong/abstain rule); `queries` maps RPC name to images
    sent for this input; bytes are serialized request/response bytes; `wall_s` the time spent on it
    (amortised over a batch when the input was certified in one).
    """

    input_id: str
    label: int
    prediction: int
    image_radius: float
    feature_radius: float
    queries: Mapping[str, int]
    bytes_up: int
    bytes_down: int
    wall_s: float

    @property
    def correct(self) -> bool:
        return self.prediction == self.label

    @property
    def certified_radius(self) -> float:
        """R if the prediction is correct, else 0 (wrong and abstained inputs certify nothing)."""
        return self.image_radius if self.correct else 0.0

    @property
    def total_queries(self) -> int:
        return sum(self.queries.values())


def average_certified_radius(records: Sequence[InputRecord]) -> float:
    """ACR: mean over all test inputs of the certified radius, 0 for wrong or abstained inputs."""
    if not records:
        raise ValueError("no records")
    return sum(r.certified_radius for r in records) / len(records)


def certified_accuracy(records: Sequence[InputRecord], radius: float) -> float:
    """Fraction of test inputs predicted correctly with certified radius >= `radius` (so at 0: accuracy)."""
    if not records:
        raise ValueError("no records")
    return sum(r.correct and r.image_radius >= radius for r in records) / len(records)


@dataclass(frozen=True)
class RunSummary:
    """One row of the paper-shaped table: a certification path on a data set."""

    service: str
    dataset: str
    num_test: int
    acr: float
    certified_accuracy: Mapping[float, float]
    queries_per_train_input: float
    queries_per_test_input: float
    bytes_per_test_input: float
    wall_s: float
    train_wall_s: float = 0.0
    note: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)


def summarize(
    records: Sequence[InputRecord],
    *,
    service: str,
    dataset: str,
    queries_per_train_input: float,
    wall_s: float,
    train_wall_s: float = 0.0,
    note: str = "",
    extra: Mapping[str, str] | None = None,
) -> RunSummary:
    """Aggregate per-input records into a table row (means over the test inputs).

    `wall_s` is the certification time of the whole test set, `train_wall_s` that of fetching training
    features and training h.
    """
    count = len(records)
    return RunSummary(
        service=service,
        dataset=dataset,
        num_test=count,
        acr=average_certified_radius(records),
        certified_accuracy={r: certified_accuracy(records, r) for r in RADII_REPORTED},
        queries_per_train_input=queries_per_train_input,
        queries_per_test_input=sum(r.total_queries for r in records) / count,
        bytes_per_test_input=sum(r.bytes_up + r.bytes_down for r in records) / count,
        wall_s=wall_s,
        train_wall_s=train_wall_s,
        note=note,
        extra=dict(extra or {}),
    )


def write_records_csv(records: Sequence[InputRecord], path: str | Path) -> None:
    """One CSV row per test input, one `queries_<rpc>` column per RPC seen."""
    rpcs = sorted({rpc for r in records for rpc in r.queries})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["input_id", "label", "prediction", "image_radius", "feature_radius",
                         "certified_radius", *(f"queries_{rpc}" for rpc in rpcs), "bytes_up", "bytes_down",
                         "wall_s"])
        for r in records:
            writer.writerow([r.input_id, r.label, r.prediction, f"{r.image_radius:.6g}",
                             f"{r.feature_radius:.6g}", f"{r.certified_radius:.6g}",
                             *(r.queries.get(rpc, 0) for rpc in rpcs), r.bytes_up, r.bytes_down,
                             f"{r.wall_s:.6g}"])


def human_bytes(num: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num < 1000 or unit == "GB":
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1000
    raise AssertionError("unreachable")


def summary_table_markdown(summaries: Sequence[RunSummary]) -> str:
    """The paper-shaped table: service, dataset, ACR, certified accuracy, queries, bytes, time."""
    radii = RADII_REPORTED
    header = ["service", "dataset", "test inputs", "ACR", *(f"CA@{r:g}" for r in radii),
              "queries / train input", "queries / test input", "bytes / test input", "train time (s)",
              "certify time (s)", "note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        cells = [s.service, s.dataset, str(s.num_test), f"{s.acr:.3f}",
                 *(f"{s.certified_accuracy[r]:.3f}" for r in radii),
                 f"{s.queries_per_train_input:g}", f"{s.queries_per_test_input:g}",
                 human_bytes(s.bytes_per_test_input), f"{s.train_wall_s:.1f}", f"{s.wall_s:.1f}", s.note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_table_text(summaries: Sequence[RunSummary], width: int = 100) -> str:
    """The same rows as summary_table_markdown for a terminal: short aligned columns within `width` characters
    (the dataset goes into the caller's title), time as train + certify, and each row's note wrapped below the
    table instead of in a column. The markdown table stays the full record (summary.md)."""
    radii = RADII_REPORTED
    header = ["service", "inputs", "ACR", *(f"CA@{r:g}".replace("0.", ".") for r in radii), "q/train", "q/test",
              "bytes/test", "time (s)"]
    rows = [[s.service, str(s.num_test), f"{s.acr:.3f}", *(f"{s.certified_accuracy[r]:.3f}" for r in radii),
             f"{s.queries_per_train_input:g}", f"{s.queries_per_test_input:g}", human_bytes(s.bytes_per_test_input),
             f"{s.train_wall_s + s.wall_s:.0f}"] for s in summaries]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths,
                                                                                                      strict=True)))
             for row in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    notes = [textwrap.fill(f"{s.service}: {s.note}", width=width, subsequent_indent="  ")
             for s in summaries if s.note]
    return "\n".join(lines + ([""] + notes if notes else []))

