"""Progress of the client's long steps: a tqdm bar on a terminal, one line per step in a log, silence in a library.

Library code marks its long loops with ``bar(...)`` and its steps with ``step(...)``; nothing shows unless a caller
(a CLI, the demo, ``run_path(progress=True)``) turned reporting on with ``reporting()``. Then bars draw only when
stderr is a terminal (tqdm's ``disable=None``), while step lines always go to stderr, so the log of a run that is
not interactive still says what it is doing. A context variable rather than a ``progress`` parameter on every
function between the CLI and the loop: fetching and training sit several calls deep (run_path -> train_downstream ->
select_head -> train_classifier), and none of them should need to know about terminals.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")

_REPORTING: ContextVar[bool] = ContextVar("reaas_client_progress", default=False)


@contextlib.contextmanager
def reporting(enabled: bool = True) -> Iterator[None]:
    """Within the block, ``bar`` and ``step`` report (``enabled``) or stay silent (False)."""
    token = _REPORTING.set(enabled)
    try:
        yield
    finally:
        _REPORTING.reset(token)


def is_reporting() -> bool:
    return _REPORTING.get()


def bar(iterable: Iterable[T] | None = None, *, desc: str, total: int | None = None, unit: str = "it",
        leave: bool = True, enabled: bool | None = None) -> tqdm:
    """A tqdm bar on stderr that draws only while reporting (or `enabled`) and only on a terminal."""
    on = _REPORTING.get() if enabled is None else enabled
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, file=sys.stderr, dynamic_ncols=True,
                disable=None if on else True)


def step(message: str) -> None:
    """One line on stderr saying what starts now (while reporting), written so it does not tear a bar."""
    if _REPORTING.get():
        tqdm.write(message, file=sys.stderr)
        sys.stderr.flush()
