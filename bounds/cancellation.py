"""Cooperative cancellation of long bound computations.

A caller that may give up (a gRPC client past its deadline) passes `should_stop`, a cheap callable; the F2I search
polls it before every bound evaluation and between the steps inside one (per image chunk, per CROWN spec chunk and
layer, per layer of the Jacobian backward passes), and raises SearchCancelled once it returns True. So work stops
within one such step, never mid-way through a tensor operation, and nothing computed before the stop is returned.
"""

from __future__ import annotations

from collections.abc import Callable

StopCheck = Callable[[], bool] | None  # None: never stop (the default everywhere; no check is made)


class SearchCancelled(Exception):
    """The caller's `should_stop` returned True, so the computation was abandoned part-way.

    Why an exception and not a partial answer: a cancelled search has not closed its bracket, so its radius is not
    the one the caller asked for, and the caller has gone anyway; unwinding from wherever the check fired (deep in
    a CROWN backward pass) is the shortest way to give the CPU back. Soundness is untouched: nothing is returned.
    """


def stop_if_asked(should_stop: StopCheck) -> None:
    """Raise SearchCancelled when `should_stop` is given and returns True."""
    if should_stop is not None and should_stop():
        raise SearchCancelled("the caller asked the bound computation to stop")
