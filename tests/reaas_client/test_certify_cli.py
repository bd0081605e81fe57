"""reaas-certify end to end, its --help, and the background server the demo relies on."""

from __future__ import annotations

import argparse
import csv

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from reaas_client import cli
from reaas_client.background_server import background_server
from reaas_server import ServerConfig, run_server


def test_help_explains_every_flag() -> None:
    parser = cli.build_parser()
    for action in parser._actions:
        if not isinstance(action, argparse._HelpAction):
            assert action.help and len(action.help) > 10, f"{action.option_strings} has no help"


def test_cli_certifies_with_two_queries_per_test_input(tmp_path) -> None:
    with run_server(ServerConfig(port=0, mode="reaas")) as (_, port):
        code = cli.main(["--server", f"127.0.0.1:{port}", "--dataset", "mnist-embedded", "--path", "reaas-bc",
                         "--train-size", "40", "--test-size", "6", "--epochs", "2", "--hidden", "16",
                         "--bound", "lipschitz", "--no-cache", "--quiet", "--out", str(tmp_path)])
    assert code == 0
    with (tmp_path / "records.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6
    assert all(r["queries_Feature"] == "1" and r["queries_F2IPerturb"] == "1" for r in rows)
    assert len({r["label"] for r in rows}) == 6  # class-balanced subset, not the first class only
    assert (tmp_path / "certified_accuracy.png").stat().st_size > 0


def test_cli_certifies_a_prototype_head_end_to_end(tmp_path) -> None:
    with run_server(ServerConfig(port=0, mode="reaas")) as (_, port):
        code = cli.main(["--server", f"127.0.0.1:{port}", "--dataset", "mnist-embedded", "--path", "reaas-bc",
                         "--train-size", "60", "--test-size", "10", "--epochs", "20", "--head", "prototype",
                         "--prototypes", "2", "--margin", "1", "--bound", "lipschitz", "--no-cache", "--quiet",
                         "--out", str(tmp_path)])
    assert code == 0
    with (tmp_path / "records.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 10
    # the exact feature radius goes through F2IPerturb like any other; a wrong prediction certifies nothing
    assert any(float(r["certified_radius"]) > 0 for r in rows)
    for r in rows:
        assert (float(r["image_radius"]) > 0) == (float(r["feature_radius"]) > 0)
        assert (float(r["certified_radius"]) > 0) == (float(r["image_radius"]) > 0 and r["prediction"] == r["label"])


def test_cli_certifies_movie_reviews_through_a_text_encoder(tmp_path) -> None:
    """--dataset rt-embedded: the reviews tokenized with the provider's vocabulary, ids sent, 2 queries each."""
    config = ServerConfig(port=0, mode="reaas", demo_kind="text-pca")
    with run_server(config) as (_, port):
        code = cli.main(["--server", f"127.0.0.1:{port}", "--dataset", "rt-embedded", "--path", "reaas-bc",
                         "--train-size", "60", "--test-size", "6", "--epochs", "2", "--head", "linear",
                         "--margin", "0", "--no-cache", "--quiet", "--out", str(tmp_path)])
        with pytest.raises(SystemExit):  # an image data set on a text encoder: a usage error, no query
            cli.main(["--server", f"127.0.0.1:{port}", "--dataset", "mnist-embedded", "--path", "reaas-bc",
                      "--quiet", "--out", str(tmp_path / "refused")])
    assert code == 0
    with (tmp_path / "records.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and {r["label"] for r in rows} == {"0", "1"}
    assert all(r["queries_Feature"] == "1" and r["queries_F2IPerturb"] == "1" for r in rows)


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2.0)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def test_background_server_is_stopped_even_on_error(tmp_path) -> None:
    with pytest.raises(KeyError), background_server("seaas", log_path=tmp_path / "server.log") as address:
        assert _serving(address)
        raise KeyError("a failing demo step")
    assert not _serving(address)


def test_cli_selects_a_head_on_training_features(tmp_path, capsys) -> None:
    with run_server(ServerConfig(port=0, mode="reaas")) as (_, port):
        code = cli.main(["--server", f"127.0.0.1:{port}", "--dataset", "mnist-embedded", "--path", "reaas-bc",
                         "--train-size", "40", "--test-size", "6", "--epochs", "2", "--hidden", "16",
                         "--head", "linear,lipschitz", "--margin", "0.5,2", "--select-head",
                         "--bound", "lipschitz", "--no-cache", "--quiet", "--out", str(tmp_path)])
    assert code == 0
    err = capsys.readouterr().err
    assert err.count("val_ACR") == 4 and err.count("* head=") == 1
    with (tmp_path / "records.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 6


def test_cli_refuses_a_grid_without_select_head() -> None:
    with pytest.raises(SystemExit):
        cli.main(["--server", "127.0.0.1:1", "--dataset", "mnist-embedded", "--path", "reaas-bc",
                  "--head", "linear,lipschitz"])
