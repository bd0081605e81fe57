"""What each role imports: the light client and reaas-keys load no torch; the lazy exports keep the public face."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

import reaas_client
import reaas_server

HEAVY = ("torch", "scipy", "statsmodels", "matplotlib", "pandas", "safetensors")


def _loaded_after(code: str) -> list[str]:
    """The HEAVY modules a fresh interpreter holds after running ``code`` (this process has torch already)."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def test_reaas_keys_imports_no_torch():
    """reaas-keys works on the ledger with the standard library; it took 40 s on a busy machine when
    reaas_server/__init__.py imported the server (and torch) with the package."""
    assert _loaded_after("import reaas_server.keys_cli") == []


def test_the_light_client_imports_no_torch():
    code = (
        "from reaas_client import EncoderClient, QueryLedger, ClientTls, RetryPolicy, ServiceError, "
        "EncoderInfo, F2IReply, UsageReport, encode_tensor, decode_tensor, average_certified_radius"
    )
    assert _loaded_after(code) == []


def test_the_certification_names_still_load_on_first_use():
    assert {"torch", "scipy", "statsmodels"} <= set(_loaded_after("import reaas_client; reaas_client.Smooth"))


@pytest.mark.parametrize(("package", "lazy"), [(reaas_client, reaas_client._CERTIFICATION_EXPORTS),
                                               (reaas_server, reaas_server._EXPORTS)], ids=["client", "server"])
def test_every_public_name_resolves_to_its_modules_object(package, lazy):
    assert set(lazy) <= set(package.__all__)
    for name in package.__all__:
        assert name in dir(package)
        value = getattr(package, name)
        if name in lazy:
            assert value is getattr(importlib.import_module(lazy[name]), name)
    with pytest.raises(AttributeError, match="has no attribute 'not_a_name'"):
        package.not_a_name  # noqa: B018
