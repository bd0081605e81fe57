"""Progress reporting: silent unless a caller turns it on; then step lines always, bars only on a terminal."""

from __future__ import annotations

import io
import sys

from reaas_client import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_library_code_is_silent_unless_reporting_is_on(capsys) -> None:
    progress.step("fetching 10 train features ...")
    with progress.bar(range(3), desc="quiet") as shown:
        assert shown.disable and list(shown) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_a_log_gets_step_lines_and_no_bar(capsys) -> None:
    with progress.reporting():
        progress.step("fetching 10 train features ...")
        with progress.bar(range(3), desc="features") as shown:
            assert shown.disable  # stderr is captured, not a terminal
            assert list(shown) == [0, 1, 2]
    assert capsys.readouterr().err == "fetching 10 train features ...\n"
    assert not progress.is_reporting()  # the block's setting ends with it


def test_a_terminal_gets_the_bar(monkeypatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with progress.reporting(), progress.bar(range(3), desc="features", unit="input") as shown:
        assert not shown.disable
        list(shown)
    assert "features: 100%" in terminal.getvalue() and "3/3" in terminal.getvalue()
    with progress.reporting(False), progress.bar(range(3), desc="off") as shown:
        assert shown.disable


def test_an_explicit_choice_overrides_the_context(monkeypatch) -> None:
    monkeypatch.setattr(sys, "stderr", _Terminal())
    with progress.bar(range(1), desc="asked for", enabled=True) as shown:
        assert not shown.disable
    with progress.reporting(), progress.bar(range(1), desc="refused", enabled=False) as shown:
        assert shown.disable
