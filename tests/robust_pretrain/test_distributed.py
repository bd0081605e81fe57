"""torchrun data-parallel on 2 CPU processes (gloo) with tiny data."""

import os
import socket
import subprocess
import sys
from pathlib import Path

from robust_pretrain import load_checkpoint

WORKER = Path(__file__).with_name("ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_end_with_identical_weights_and_one_checkpoint(tmp_path):
    """Each process sees other images and other random views; only gradient averaging keeps them equal."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[2]))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(WORKER),
        str(tmp_path),
    ]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    digests = {path.name: path.read_text() for path in tmp_path.glob("*.sha256")}
    assert sorted(digests) == ["rank0-of-2.sha256", "rank1-of-2.sha256"]
    assert len(set(digests.values())) == 1
    metadata = load_checkpoint(tmp_path / "encoder").metadata
    assert metadata.sha256 == digests["rank0-of-2.sha256"]
    assert metadata.training["world_size"] == 2
