"""Every console script turns the mistakes people make into one line on stderr that names the fix (exit 2 for a
usage mistake, 1 for a service error), never a traceback; --version and the environment variables in --help.

The CLIs run in-process (``main(argv)``); the service errors come from real servers on ephemeral loopback ports."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable

import grpc
import pytest
import torch

from reaas_client import cli as certify_cli
from reaas_client import demo
from reaas_client.client import ServiceError
from reaas_client.command_line import UsageError, explain, package_version, reported_errors
from reaas_server import ServerConfig, keys_cli, run_server
from reaas_server import cli as server_cli
from reaas_server.ledger import UsageLedger
from robust_pretrain import cli as pretrain_cli

TINY_RUN = ["--dataset", "mnist-embedded", "--path", "reaas-bc", "--train-size", "20", "--test-size", "2",
            "--epochs", "1", "--hidden", "8", "--bound", "lipschitz", "--no-cache", "--quiet"]


def one_line_error(capsys, run: Callable[[], object], code: int) -> str:
    """The single stderr line `run` exits with (status `code`), after checking there is nothing else."""
    with pytest.raises(SystemExit) as exited:
        run()
    err = capsys.readouterr().err
    assert exited.value.code == code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    """A REaaS server whose ledger has issued a key (so a call without one is refused); yields (address, key)."""
    ledger_path = tmp_path_factory.mktemp("ledger") / "ledger.sqlite3"
    ledger = UsageLedger(ledger_path)
    secret = ledger.add_key("alice")
    ledger.close()
    with run_server(ServerConfig(port=0, ledger_path=ledger_path, bound_cost_budget_s=0)) as (_, port):
        yield f"127.0.0.1:{port}", secret


@pytest.fixture()
def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- reaas-certify: service errors (exit 1) -------------------------------------------------------------------

def test_certify_without_a_key_names_the_variable(keyed_server, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("REAAS_API_KEY", raising=False)
    address, _ = keyed_server
    line = one_line_error(capsys, lambda: certify_cli.main(["--server", address, *TINY_RUN, "--out", str(tmp_path)]),
                          1)
    assert "UNAUTHENTICATED" in line and "REAAS_API_KEY" in line and "reaas-keys add" in line


def test_certify_reads_the_key_from_the_environment_and_logs_its_steps(keyed_server, tmp_path, monkeypatch,
                                                                      capsys) -> None:
    address, secret = keyed_server
    monkeypatch.setenv("REAAS_API_KEY", secret)
    loud = [flag for flag in TINY_RUN if flag != "--quiet"]
    assert certify_cli.main(["--server", address, *loud, "--out", str(tmp_path)]) == 0
    assert (tmp_path / "records.csv").exists()
    log = capsys.readouterr().err  # not a terminal: step lines, no bars
    assert "fetching 20 train features" in log and "REaaS-BC: certifying 2 test inputs" in log
    assert "%|" not in log


def test_certify_at_a_port_nobody_serves_says_to_start_a_server(closed_port, tmp_path, capsys) -> None:
    line = one_line_error(capsys, lambda: certify_cli.main(
        ["--server", f"127.0.0.1:{closed_port}", "--timeout", "5", *TINY_RUN, "--out", str(tmp_path)]), 1)
    assert "no server answered" in line and "--server HOST:PORT" in line


def test_certify_over_tls_to_an_insecure_port_names_the_tls_flags(keyed_server, tmp_path, capsys) -> None:
    address, _ = keyed_server
    line = one_line_error(capsys, lambda: certify_cli.main(
        ["--server", address, "--tls", "--timeout", "5", *TINY_RUN, "--out", str(tmp_path)]), 1)
    assert "UNAVAILABLE" in line and "--tls" in line and "insecure" in line


def test_certify_a_reaas_path_on_a_seaas_server_is_refused_before_training(tmp_path, capsys) -> None:
    with run_server(ServerConfig(port=0, mode="seaas", bound_cost_budget_s=0)) as (_, port):
        line = one_line_error(capsys, lambda: certify_cli.main(
            ["--server", f"127.0.0.1:{port}", *TINY_RUN, "--out", str(tmp_path)]), 2)
    assert "--mode seaas" in line and "--path seaas-sc" in line


# --- usage mistakes (exit 2, before any work) --------------------------------------------------------------------

def test_certify_with_a_data_folder_that_does_not_exist(tmp_path, capsys) -> None:
    line = one_line_error(capsys, lambda: certify_cli.main(
        ["--server", "127.0.0.1:1", "--dataset", "cifar10", "--data", str(tmp_path / "absent"), "--path",
         "reaas-bc"]), 2)
    assert "--data" in line and "does not exist" in line


@pytest.mark.parametrize("main", [server_cli.main, demo.main])
def test_a_missing_checkpoint(main, tmp_path, capsys) -> None:
    line = one_line_error(capsys, lambda: main(["--checkpoint", str(tmp_path / "encoder")]), 2)
    assert "encoder.safetensors" in line and "reaas-pretrain" in line


def test_server_with_a_checkpoint_folder_names_the_checkpoint_inside(tmp_path, capsys) -> None:
    (tmp_path / "encoder.safetensors").write_bytes(b"")
    line = one_line_error(capsys, lambda: server_cli.main(["--checkpoint", str(tmp_path)]), 2)
    assert "is a folder" in line and f"give {(tmp_path / 'encoder').as_posix()}" in line


def test_server_with_a_corrupt_checkpoint_says_which_file(tmp_path, capsys) -> None:
    (tmp_path / "encoder.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "encoder.json").write_text(json.dumps({"format_version": 1}))
    line = one_line_error(capsys, lambda: server_cli.main(
        ["--port", "0", "--ledger", ":memory:", "--checkpoint", str(tmp_path / "encoder")]), 2)
    assert "encoder.json" in line and "reaas-pretrain" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("main", [server_cli.main, pretrain_cli.main])
def test_device_cuda_without_cuda_is_refused_at_parse_time(main, capsys) -> None:
    line = one_line_error(capsys, lambda: main(["--device", "cuda"]), 2)
    assert "no usable CUDA device" in line and "--device cpu" in line


def test_server_default_bound_typo_is_refused_at_parse_time(capsys) -> None:
    line = one_line_error(capsys, lambda: server_cli.main(["--default-bound", "best-ibp"]), 2)
    assert "invalid choice: 'best-ibp'" in line and "best_ibp" in line


def test_server_tls_key_of_another_certificate_names_both_files(tmp_path, capsys) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    ca.issue_cert("localhost").cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
    ca.issue_cert("localhost").private_key_pem.write_to_path(str(tmp_path / "other.key"))
    line = one_line_error(capsys, lambda: server_cli.main(
        ["--tls-cert", str(tmp_path / "server.pem"), "--tls-key", str(tmp_path / "other.key")]), 2)
    assert "other.key is not the private key of" in line and "server.pem" in line


def test_keys_ledger_may_follow_the_subcommand_and_a_folder_is_refused(tmp_path, capsys) -> None:
    ledger = tmp_path / "ledger.sqlite3"
    assert keys_cli.main(["add", "bob", "--ledger", str(ledger)]) == 0
    capsys.readouterr()
    assert keys_cli.main(["--ledger", str(ledger), "list"]) == 0
    assert "bob" in capsys.readouterr().out
    line = one_line_error(capsys, lambda: keys_cli.main(["list", "--ledger", str(tmp_path)]), 2)
    assert "is a folder" in line and "ledger.sqlite3" in line
    line = one_line_error(capsys, lambda: keys_cli.main(["--ledger", str(ledger), "revoke", "carol"]), 2)
    assert "no active key named 'carol'" in line


def test_pretrain_with_a_data_path_that_does_not_exist(tmp_path, capsys) -> None:
    line = one_line_error(capsys, lambda: pretrain_cli.main(
        ["--data", "cifar10", "--data-path", str(tmp_path / "absent"), "--out-dir", str(tmp_path)]), 2)
    assert "--data-path" in line and "does not exist" in line


def test_debug_adds_the_traceback(closed_port, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        certify_cli.main(["--server", f"127.0.0.1:{closed_port}", "--timeout", "5", "--debug", *TINY_RUN,
                          "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("reaas-certify: error: no server answered")


# --- --version and the environment in --help ---------------------------------------------------------------------

@pytest.mark.parametrize(("main", "prog"), [(server_cli.main, "reaas-server"), (keys_cli.main, "reaas-keys"),
                                            (certify_cli.main, "reaas-certify"), (pretrain_cli.main, "reaas-pretrain"),
                                            (demo.main, "python -m reaas_client.demo")])
def test_every_console_script_has_version(main, prog, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"{prog} {package_version()}"


@pytest.mark.parametrize(("main", "variables"), [(server_cli.main, ["REAAS_LEDGER"]),
                                                 (keys_cli.main, ["REAAS_LEDGER"]),
                                                 (certify_cli.main, ["REAAS_API_KEY"])])
def test_help_lists_the_environment_variables_read(main, variables, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    assert "environment variables:" in help_text and all(v in help_text for v in variables)


# --- the mapping itself -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("error", "code", "fix"), [
    (ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "quota of 'alice' used up"), 1, "next quota period"),
    (ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"), 1, "raise --timeout"),
    (ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "unknown bound 'foo'"), 1, "unknown bound 'foo'"),
    (ServiceError(grpc.StatusCode.INTERNAL, "boom"), 1, "send the provider this line"),
    (FileNotFoundError(2, "No such file or directory", "data/x.tsv"), 2, "data/x.tsv does not exist"),
    (IsADirectoryError(21, "Is a directory", "runs/out"), 2, "runs/out is a folder"),
    (PermissionError(13, "Permission denied", "/var/lib/x"), 2, "permission denied on /var/lib/x"),
    (UsageError("--path reaas-bc needs F2IPerturb"), 2, "--path reaas-bc needs F2IPerturb"),
])
def test_explain_names_a_fix(error, code, fix) -> None:
    explained = explain(error)
    assert explained is not None and explained[0] == code and fix in explained[1]


def test_a_bug_keeps_its_traceback() -> None:
    assert explain(KeyError("config")) is None and explain(OSError("no file name")) is None
    with pytest.raises(ZeroDivisionError), reported_errors("prog"):
        _ = 1 / 0
