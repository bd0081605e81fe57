"""What every console script shares: one-line errors a person can act on, ``--version``, ``--debug``, and the
environment variables it reads listed in ``--help``.

A CLI builds its parser as a ``CommandLineParser`` (a usage mistake prints one line naming the fix and exits 2,
instead of argparse's whole usage block), calls ``add_standard_flags`` and runs its work inside ``reported_errors``.
There a service error (exit 1), a missing, unreadable or misplaced file, or an error type the CLI names as a usage
error (exit 2) becomes one line on stderr; ``--debug`` prints the traceback as well. Anything else is a bug and keeps
its traceback.

No torch and no generated stubs are imported here, so ``reaas-keys`` stays light. The server's CLIs import this module
as they import ``reaas_client.wire``: both are shared by the two sides (STYLE.md plans one wire package for them).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import textwrap
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path

import grpc

from reaas_scripts import version as package_version

EXIT_SERVICE = 1
"""Exit status when the service (or the channel to it) refused or failed a call."""
EXIT_USAGE = 2
"""Exit status of a mistake in how the program was called: a flag, a path, a file's contents (argparse's own)."""


class UsageError(Exception):
    """A mistake in how the program was called; the message says what to do instead."""


class CommandLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (the usage block is what ``--help`` is for) and whose help ends
    with the environment variables the program reads, ``environment``: name -> what it sets."""

    def __init__(self, *args, environment: Mapping[str, str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.environment = dict(environment or {})

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def format_help(self) -> str:
        text = super().format_help()
        if not self.environment:
            return text
        width = min(shutil.get_terminal_size().columns - 2, 100)  # argparse's own width rule, capped
        lines = ["", "environment variables:"]
        for name, meaning in self.environment.items():
            lines += textwrap.wrap(meaning, width=width, initial_indent=f"  {name:<16}", subsequent_indent=" " * 18)
        return text + "\n".join(lines) + "\n"


def add_standard_flags(parser: argparse.ArgumentParser) -> None:
    """``--version`` and ``--debug`` (the traceback behind a one-line error)."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the traceback as well as the one-line message")


def existing_path(text: str) -> Path:
    """argparse ``type=`` for a path that must exist (file or folder): a missing one is a usage error at parse time."""
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist; check the path")
    return Path(text)


def checkpoint_argument(text: str) -> Path:
    """argparse ``type=`` for --checkpoint: PATH of PATH.safetensors + PATH.json (either suffix may be given), both
    present; a folder gets a message naming the checkpoint inside it. Contents are checked when loading."""
    from robust_pretrain.checkpoint import (
        checkpoint_paths,  # the one naming rule; torch only when the flag is given
    )

    path = Path(text)
    if path.is_dir():
        inside = sorted(p.with_suffix("").as_posix() for p in path.glob("*.safetensors"))
        hint = f"give {' or '.join(inside)}" if inside else "it holds no .safetensors checkpoint"
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a checkpoint; {hint}")
    missing = [str(p) for p in checkpoint_paths(path) if not p.is_file()]
    if missing:
        raise argparse.ArgumentTypeError(f"{' and '.join(missing)} not found; give the PATH reaas-pretrain wrote "
                                         "PATH.safetensors and PATH.json to")
    return path


def available_device(text: str) -> str:
    """argparse ``type=`` for --device: cpu or a CUDA device this machine has, so cuda without CUDA is refused at
    parse time, not seconds later while loading. torch is imported only when the flag is given."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is no torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}: this machine has no usable CUDA device (torch "
                                             f"{torch.__version__}); use --device cpu or leave --device out")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: only {count} CUDA device(s) here; use cuda:0 to "
                                             f"cuda:{count - 1}")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text}: use cpu or cuda[:N]")
    return text


@contextlib.contextmanager
def reported_errors(prog: str, *, debug: bool = False,
                    usage_errors: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Run the body; an error a person can act on leaves as one line on stderr and SystemExit(1 or 2).

    `usage_errors`: further exception types whose message already names the fix (a corrupt checkpoint, an
    unknown key name); they exit 2. With `debug` the traceback is printed above the line."""
    try:
        yield
    except Exception as error:
        explained = explain(error, usage_errors)
        if explained is None:
            raise
        code, message = explained
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(code) from None


def explain(error: BaseException, usage_errors: tuple[type[BaseException], ...] = ()) -> tuple[int, str] | None:
    """(exit status, one line naming the fix) for an error a person can act on; None for anything else (a bug)."""
    status = _grpc_status(error)
    if status is not None:
        return EXIT_SERVICE, _service_message(*status)
    if isinstance(error, (UsageError, *usage_errors)):
        return EXIT_USAGE, str(error)
    if isinstance(error, OSError) and error.filename is not None:
        return _file_message(error)
    return None


def _grpc_status(error: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """(code, details) of a reaas_client ServiceError or a raw grpc.RpcError (both carry a StatusCode)."""
    code = getattr(error, "code", None)
    if isinstance(code, grpc.StatusCode):
        return code, str(getattr(error, "details", "") or "")
    if isinstance(error, grpc.RpcError) and callable(code):
        return code(), error.details() or ""  # type: ignore[attr-defined]
    return None


_TLS_SIGNS = ("ssl", "tls", "handshake", "socket closed", "certificate")


def _service_message(code: grpc.StatusCode, details: str) -> str:
    said = f"{code.name}: {details.strip()}" if details.strip() else code.name
    if code == grpc.StatusCode.UNAVAILABLE:
        lowered = details.lower()
        if any(sign in lowered for sign in _TLS_SIGNS):
            return (f"the TLS handshake failed ({said}); match the server: --tls / --tls-ca CA.pem for a TLS port, "
                    "no --tls* flag for an insecure one, --tls-client-cert/--tls-client-key for mutual TLS")
        if "connection refused" in lowered or "failed to connect" in lowered:
            return (f"no server answered ({said}); start reaas-server there or fix the address "
                    "(--server HOST:PORT, the port reaas-server printed)")
        return (f"the server is unavailable ({said}); check that reaas-server runs at --server HOST:PORT and that "
                "the channel's TLS matches its port (--tls* flags for a TLS port, none for an insecure one)")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return (f"the server refused the API key ({said}); pass a key issued with reaas-keys add, "
                "preferably as $REAAS_API_KEY (a --api-key flag is visible in ps)")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return f"the server denied the call ({said}); ask the provider for a key allowed to make it"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return (f"the server refused for lack of capacity or quota ({said}); wait for the next quota period "
                "(the provider's reaas-keys list shows the key's use) or send smaller batches (--batch-size)")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"a call ran past its deadline ({said}); raise --timeout or certify fewer inputs at once"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return (f"this server does not offer the call ({said}); REaaS paths need a server in --mode reaas "
                "(a --mode seaas server answers Feature only)")
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE):
        return f"the server refused the request ({said}); change the flag it names"
    return f"the service failed ({said}); retry, and if it persists send the provider this line"


def _file_message(error: OSError) -> tuple[int, str]:
    name = error.filename
    if isinstance(error, FileNotFoundError):
        return EXIT_USAGE, f"{name} does not exist; check the path (or create it first)"
    if isinstance(error, IsADirectoryError):
        return EXIT_USAGE, f"{name} is a folder where a file is needed; name a file (inside it)"
    if isinstance(error, NotADirectoryError):
        return EXIT_USAGE, f"{name}: a part of this path is a file, not a folder; check the path"
    if isinstance(error, PermissionError):
        return EXIT_USAGE, f"permission denied on {name}; choose a path you may use or change its permissions"
    return EXIT_SERVICE, f"{error.strerror or error} on {name}; free space or fix the file system, then retry"
