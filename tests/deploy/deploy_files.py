"""Reading deploy/ in the tests: where it is, and the Dockerfile as a list of instructions (no parser installs here)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines
            if line and not line.startswith("#")]


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The instructions of each stage, FROM first (the global ARGs before the first FROM are left out)."""
    instructions = dockerfile_instructions()
    starts = [i for i, (op, _) in enumerate(instructions) if op == "FROM"]
    return [instructions[start:end] for start, end in zip(starts, [*starts[1:], len(instructions)], strict=True)]


def dockerfile_arg_defaults() -> dict[str, str]:
    return dict(args.split("=", 1) for op, args in dockerfile_instructions() if op == "ARG" and "=" in args)
