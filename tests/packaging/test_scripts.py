"""reaas_scripts: each console script checks its role's extra and says in one line which to install."""

from __future__ import annotations

import importlib
from importlib import metadata

import pytest

import reaas_scripts


def test_extra_requirements_reads_the_marker_of_each_line():
    lines = [
        "grpcio>=1.85.1",
        'torch==2.13.0; extra == "server"',
        "prometheus_client>=0.20; extra == 'server'",
        'statsmodels>=0.14; extra == "certify"',
        'scipy>=1.11 ; python_version >= "3.11" and extra == "server"',
        'pytest>=8; extra == "serverless"',
    ]
    assert reaas_scripts.extra_requirements(lines, "server") == ["torch", "prometheus_client", "scipy"]
    assert reaas_scripts.extra_requirements(lines, "certify") == ["statsmodels"]
    assert reaas_scripts.extra_requirements(lines, "dev") == []


def test_every_console_script_of_the_distribution_goes_through_the_check():
    """setup.cfg's console_scripts and reaas_scripts.SCRIPTS name the same scripts, each entry point runs its own
    script, each target is importable here (make setup installs every extra), and each extra exists."""
    entry_points = {ep.name: ep for ep in metadata.distribution("reaas").entry_points if ep.group == "console_scripts"}
    assert set(entry_points) == set(reaas_scripts.SCRIPTS)
    extras = set(metadata.metadata("reaas").get_all("Provides-Extra"))
    for name, script in reaas_scripts.SCRIPTS.items():
        assert entry_points[name].value == f"reaas_scripts:{name.replace('-', '_')}"
        assert script.extra is None or script.extra in extras
        module, _, function = script.target.partition(":")
        assert callable(getattr(importlib.import_module(module), function))


def test_every_extra_is_installed_in_the_development_environment():
    for script in reaas_scripts.SCRIPTS.values():
        if script.extra is not None:
            assert reaas_scripts.missing_distributions(script.extra) == [], script.name


def test_a_missing_extra_is_one_line_and_exit_status_2(monkeypatch, capsys):
    monkeypatch.setattr(reaas_scripts, "_installed", lambda name: name not in {"torch", "statsmodels"})
    monkeypatch.setattr("sys.argv", ["reaas-certify", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        reaas_scripts.reaas_certify()
    assert exit_info.value.code == reaas_scripts.MISSING_EXTRA_STATUS == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "reaas-certify needs the reaas[certify] extra (missing: torch, statsmodels)" in err
    assert "pip install 'reaas[certify]'" in err


def test_a_script_whose_extra_is_installed_runs_its_cli(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["reaas-keys", "--help"])
    with pytest.raises(SystemExit) as exit_info:  # argparse's --help exits 0
        reaas_scripts.reaas_keys()
    assert exit_info.value.code == 0
    assert "usage: reaas-keys" in capsys.readouterr().out


def test_version_is_the_installed_distributions():
    assert reaas_scripts.version() == metadata.version("reaas") != "unknown"
