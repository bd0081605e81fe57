"""The console scripts of the reaas distribution, each behind a check that its role's extra is installed.

The base install is the light client (grpcio, protobuf, numpy); a CLI whose role needs more says which extra to
install, in one line with exit status 2, instead of a traceback from deep inside an import. The extras and their
packages are read from the installed distribution's own metadata (setup.py is their one source), so this module
holds no second list. Standard library only: it runs before anything else is imported.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata

DISTRIBUTION = "reaas"
#: exit status of a console script whose extra is missing (argparse's for a usage error)
MISSING_EXTRA_STATUS = 2


def version() -> str:
    """The installed reaas distribution's version (setup.cfg's), or "unknown" for a source tree never installed."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class ConsoleScript:
    """A console script: its name, the ``module:function`` it runs, and the extra its imports need (None: base)."""

    name: str
    target: str
    extra: str | None


SCRIPTS: dict[str, ConsoleScript] = {
    script.name: script
    for script in (
        ConsoleScript("reaas-server", "reaas_server.cli:run", "server"),
        ConsoleScript("reaas-keys", "reaas_server.keys_cli:main", None),  # the ledger is SQLite: standard library
        ConsoleScript("reaas-certify", "reaas_client.cli:main", "certify"),
        ConsoleScript("reaas-pretrain", "robust_pretrain.cli:main", "pretrain"),
    )
}

_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def extra_requirements(requirements: Iterable[str], extra: str) -> list[str]:
    """The distribution names an extra adds, from requirement lines as ``importlib.metadata.requires`` gives them
    (``'torch==2.13.0; extra == "certify"'``)."""
    marker = re.compile(rf"""extra\s*==\s*["']{re.escape(extra)}["']""")
    names = []
    for line in requirements:
        requirement, _, markers = line.partition(";")
        if marker.search(markers) and (match := _NAME.match(requirement)):
            names.append(match.group(1))
    return names


def _installed(name: str) -> bool:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def missing_distributions(extra: str, *, installed: Callable[[str], bool] | None = None) -> list[str]:
    """The distributions of ``extra`` that are not ``installed`` (default: found by importlib.metadata); none when
    reaas itself is not installed (a source tree run as is, with no metadata to read: its imports speak for
    themselves)."""
    try:
        requirements = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return []
    is_installed = installed if installed is not None else _installed
    return [name for name in extra_requirements(requirements, extra) if not is_installed(name)]


def missing_extra_message(script: ConsoleScript, missing: list[str]) -> str:
    return (f"{script.name} needs the reaas[{script.extra}] extra (missing: {', '.join(missing)}); "
            f"install it with: pip install 'reaas[{script.extra}]'")


def run(name: str) -> int | None:
    """Run console script ``name``: exit 2 with one line on stderr when its extra is missing, else import its CLI
    and return what its ``main`` returns (the console-script wrapper passes it to ``sys.exit``)."""
    script = SCRIPTS[name]
    if script.extra is not None and (missing := missing_distributions(script.extra)):
        print(missing_extra_message(script, missing), file=sys.stderr)
        sys.exit(MISSING_EXTRA_STATUS)
    # gRPC core logs INFO lines (a failed TLS handshake, say) on stderr beside the CLI's own one-line error; a
    # person running a command wants the one line. Set before grpc is imported; an operator's own value wins.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    module_name, _, function = script.target.partition(":")
    return getattr(importlib.import_module(module_name), function)()


def reaas_server() -> int | None:
    return run("reaas-server")


def reaas_keys() -> int | None:
    return run("reaas-keys")


def reaas_certify() -> int | None:
    return run("reaas-certify")


def reaas_pretrain() -> int | None:
    return run("reaas-pretrain")
