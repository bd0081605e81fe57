"""What every benchmark prints and records: the machine it ran on and the command that produced it."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_summary() -> str:
    """One line: host CPU, cores, torch build and threads, accelerator if any."""
    accelerator = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.system()} {platform.machine()}, {cpu_model()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"{accelerator}"
    )


def load_line() -> str:
    """The 1/5/15-minute load averages, said plainly: on a shared machine they tell how busy the cores were."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min) on {os.cpu_count()} cores"


def invoked_command() -> str:
    """The command line that ran this benchmark (module form, as the Makefile targets call it)."""
    args = sys.argv[1:]
    module = sys.modules["__main__"].__spec__
    program = f"python -m {module.name}" if module is not None else shlex.quote(sys.argv[0])
    return " ".join([program, *map(shlex.quote, args)])


def write_results(name: str, title: str, body: str, *, make_target: str | None = None) -> Path:
    """Write benchmarks/results/<name>.md with a header naming the machine, date and command."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    made_by = f"`make {make_target}` (= `{invoked_command()}`)" if make_target else f"`{invoked_command()}`"
    header = f"# {title}\n\nMade by {made_by} on {stamp}.\n\nMachine: {machine_summary()}.\n\n"
    path.write_text(header + body.rstrip() + "\n")
    return path


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
