"""bench-certify's tables and verdicts, computed from the rows (never typed): the main table, REaaS-BC on all test
inputs, the goals with their verdicts, and the robust vs non-robust pre-training ratios."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import nn

from benchmarks.certify_rows import Row
from benchmarks.environment import markdown_table
from reaas_client.metrics import RunSummary, certified_accuracy, human_bytes
from reaas_client.plotting import plot_certified_accuracy

RADII: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
#: text radii are in embedding units: one word substituted by a near neighbour moves the matrix by ~0.5-0.8
TEXT_RADII: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5)
GOAL_ACR = 1.6
GOAL_CLEAN = 0.95
GOAL_RATIO = 10.0


def clean_accuracy(row: Row) -> float:
    """Of the certified classifier: h(f(x)) for BC, the smoothed prediction for SC (abstain = wrong)."""
    return row.summary.certified_accuracy[0.0]


def attack_mean(row: Row) -> float:
    return float(row.attack.mean())


def main_table(rows: Sequence[Row], radii: Sequence[float] = RADII) -> str:
    header = ["encoder", "path", "head", "test inputs", "clean acc", "ACR", *(f"CA@{r:g}" for r in radii),
              "attack radius (mean)", "certified / attack", "queries / train input", "queries / test input",
              "bytes / test input", "train s", "certify s", "attack s", "note"]
    body = []
    for row in rows:
        s, records = row.summary, row.result.records[: row.summary.num_test]
        attack = attack_mean(row)
        body.append([row.encoder, row.service, row.head or "mlp", s.num_test, f"{clean_accuracy(row):.3f}",
                     f"{s.acr:.3f}", *(f"{certified_accuracy(records, r):.3f}" for r in radii), f"{attack:.3f}",
                     f"{s.acr / attack:.2f}" if attack > 0 else "-", f"{s.queries_per_train_input:g}",
                     f"{s.queries_per_test_input:g}", human_bytes(s.bytes_per_test_input), f"{s.train_wall_s:.0f}",
                     f"{s.wall_s:.0f}", f"{row.attack_s:.0f}", row.note])
    return markdown_table(header, body)


def all_test_table(summaries: dict[str, RunSummary]) -> str:
    rows = [[name, s.service, s.extra.get("head", ""), s.num_test, f"{s.certified_accuracy[0.0]:.3f}", f"{s.acr:.3f}",
             f"{s.wall_s:.0f}"] for name, s in summaries.items()]
    return markdown_table(["encoder", "path", "head", "test inputs", "clean acc", "ACR", "certify s"], rows)


def soundness_line(rows: Sequence[Row], max_radius: float) -> str:
    """BC certificates are about h(f(.)) itself, so none may exceed its attack radius: count violations. Where
    the attack found nothing up to `max_radius` it only says "radius >= max_radius" (censored): no check there."""
    checks = []
    for row in rows:
        if row.service != "REaaS-BC":
            continue
        certified = [r.certified_radius for r in row.result.records[: row.summary.num_test]]
        attack = row.attack.tolist()
        above = sum(c > a + 1e-9 for c, a in zip(certified, attack, strict=True) if a < max_radius)
        censored = sum(a >= max_radius for a in attack)
        checks.append(f"{row.encoder} {above}" + (f" ({censored} censored)" if censored else ""))
    return ("REaaS-BC inputs whose certified radius exceeds the attack radius (must be 0; any other count is a "
            f"soundness bug; censored = no label change found up to {max_radius:g}, counted as {max_radius:g} in "
            "the mean): " + ", ".join(checks) + ".")


def _find(rows: Sequence[Row], encoder: str, service: str) -> Row | None:
    return next((r for r in rows if r.encoder == encoder and r.service == service), None)


def _verdict(ok: bool) -> str:
    return "met" if ok else "**NOT met**"


def _degenerate(row: Row, subject: str = "") -> str:
    """A head that predicts (nearly) one class has a huge radius on the inputs of that class: say so (`subject`
    names the row when it is not the one the line is about)."""
    acc = clean_accuracy(row)
    classes = [m for m in row.result.classifier.modules() if isinstance(m, nn.Linear)][-1].out_features
    # on class-balanced test inputs a constant classifier scores 1/K: within 0.05 of it (or below 0.5) is no better
    degenerate = acc < 0.5 or acc <= 1 / classes + 0.05
    return f" -- but {subject + ' is ' if subject else ''}DEGENERATE: clean acc {acc:.3f}, a near-constant classifier" \
        if degenerate else ""


PAPER_TEXT_ACR = 2.517  # the paper's NLP extension: another data set and encoder, for scale only


def text_goals(rows: Sequence[Row], new: str, nonrobust: str) -> str:
    """Issue 12's goals: REaaS (1 / 2 queries per training / test input) >= SEaaS-SC at full N, with clean accuracy
    beside every ACR, and the robust vs non-robust rows; the paper's NLP figure stands beside for scale."""
    lines = []
    seaas = [r for r in rows if r.service == "SEaaS-SC"]
    best_seaas = max(seaas, key=lambda r: r.summary.acr) if seaas else None
    for service in ("REaaS-BC", "REaaS-SC"):
        row = _find(rows, new, service)
        if row is None:
            lines.append(f"* {new} {service} >= SEaaS-SC: **NOT met** (no row: encoder not run)")
            continue
        acr, acc = row.summary.acr, clean_accuracy(row)
        if best_seaas is None:
            lines.append(f"* {new} {service} >= SEaaS-SC: **NOT met** (no SEaaS-SC row)")
        else:
            lines.append(f"* {new} {service} ACR >= the best SEaaS-SC's: {_verdict(acr >= best_seaas.summary.acr)} "
                         f"(ACR {acr:.3f} at clean acc {acc:.3f}, {row.summary.queries_per_test_input:g} queries per "
                         f"test input; SEaaS-SC through {best_seaas.encoder}: ACR {best_seaas.summary.acr:.3f} at "
                         f"clean acc {clean_accuracy(best_seaas):.3f}, "
                         f"{best_seaas.summary.queries_per_test_input:g} queries)"
                         f"{_degenerate(best_seaas, 'that SEaaS-SC row')}{_degenerate(row)}")
        plain = _find(rows, nonrobust, service)
        if plain is not None:
            lines.append(f"* robust vs non-robust pre-training ({service}, {new} vs {nonrobust}): ACR "
                         f"{acr:.3f} vs {plain.summary.acr:.3f} (clean acc {acc:.3f} vs {clean_accuracy(plain):.3f})")
    lines.append(f"* For scale only: the paper's NLP extension reports ACR {PAPER_TEXT_ACR} on another data set, "
                 "encoder and embedding scale; it is not a claim about these rows.")
    return "\n".join(lines)


def goals(rows: Sequence[Row], new: str, floor: str = "pca", nonrobust: str = "nonrobust") -> str:
    """Each goal of issue 9 with its verdict and the figures it rests on (missing rows make a goal NOT met)."""
    lines = []
    seaas = [r for r in rows if r.service == "SEaaS-SC"]
    for service in ("REaaS-BC", "REaaS-SC"):
        row = _find(rows, new, service)
        if row is None:
            lines.append(f"* {new} {service}: **NOT met** (no row: encoder not run)")
            continue
        acr, acc = row.summary.acr, clean_accuracy(row)
        lines.append(f"* {new} {service} ACR >= {GOAL_ACR} with clean accuracy >= {GOAL_CLEAN}: "
                     f"{_verdict(acr >= GOAL_ACR and acc >= GOAL_CLEAN)} (ACR {acr:.3f}, clean acc {acc:.3f})")
        base = _find(rows, floor, service)
        if new == floor:
            lines.append(f"* {new} {service} above the PCA floor: **NOT met** (the new encoder is the floor itself)")
        elif base is None:
            lines.append(f"* {new} {service} above the PCA floor: **NOT met** (no {floor} row)")
        else:
            lines.append(f"* {new} {service} above the PCA floor: {_verdict(acr > base.summary.acr)} "
                         f"(ACR {acr:.3f} vs {floor} {base.summary.acr:.3f}){_degenerate(row)}")
        if not seaas:
            lines.append(f"* {new} {service} above SEaaS-SC through any encoder: **NOT met** (no SEaaS-SC row)")
        else:
            best = max(seaas, key=lambda r: r.summary.acr)
            lines.append(f"* {new} {service} above SEaaS-SC through any encoder: "
                         f"{_verdict(acr > best.summary.acr)} (ACR {acr:.3f} vs best SEaaS-SC, through "
                         f"{best.encoder}, {best.summary.acr:.3f}){_degenerate(row)}")
    for service in ("REaaS-BC", "REaaS-SC"):
        robust, plain = _find(rows, new, service), _find(rows, nonrobust, service)
        if robust is None or plain is None:
            lines.append(f"* robust vs non-robust pre-training >= {GOAL_RATIO:g}x ACR ({service}): **NOT met** "
                         "(row missing)")
            continue
        ratio = robust.summary.acr / max(plain.summary.acr, 1e-12)
        lines.append(f"* robust vs non-robust pre-training >= {GOAL_RATIO:g}x ACR ({service}, {new} vs {nonrobust}):"
                     f" {_verdict(ratio >= GOAL_RATIO)} ({robust.summary.acr:.3f} / {plain.summary.acr:.3f} = "
                     f"{ratio:.1f}x){_degenerate(robust)}")
    return "\n".join(lines)


def pretraining_comparison(rows: Sequence[Row], pairs: Sequence[tuple[str, str]]) -> str:
    """ACR ratios robust / non-robust per REaaS path, from the main table's rows (paper, CIFAR-10: ~13x)."""
    body = []
    for robust, plain in pairs:
        for service in ("REaaS-BC", "REaaS-SC"):
            a, b = _find(rows, robust, service), _find(rows, plain, service)
            if a is None or b is None:
                body.append([f"{robust} vs {plain}", service, "-", "-", "row missing"])
                continue
            ratio = a.summary.acr / max(b.summary.acr, 1e-12)
            body.append([f"{robust} vs {plain}", service, f"{a.summary.acr:.3f}", f"{b.summary.acr:.3f}",
                         f"{ratio:.1f}x"])
    return markdown_table(["pair", "path", "robust ACR", "non-robust ACR", "ratio"], body)


def plot(rows: Sequence[Row], path: Path, title: str, modality: str = "image") -> Path:
    curves = {f"{r.service} / {r.encoder}": r.result.records[: r.summary.num_test] for r in rows}
    return plot_certified_accuracy(curves, path, title=title, modality=modality)
