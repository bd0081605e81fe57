"""A server started as a helper child ends with its parent: ``$REAAS_EXIT_WITH_PARENT`` names the parent's pid.

Set by ``reaas_client.background_server`` (the demo, benchmarks and tests start `reaas-server` children). The child
asks Linux for SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG), then checks that the parent is still the one
named: if it died before the request, the child exits at once. This used to run as a subprocess pre-exec hook in
the parent, but a pre-exec hook makes Python fork with its fork handlers, and gRPC's waited forever for the
parent's gRPC threads (the benchmark hung in fork, 3 runs in 7 of bench-scale).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

ENVIRONMENT = "REAAS_EXIT_WITH_PARENT"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def exit_with_parent() -> None:
    """Apply $REAAS_EXIT_WITH_PARENT, if set (Linux only; elsewhere the parent stops the child itself)."""
    parent = os.environ.get(ENVIRONMENT)
    if not parent or sys.platform != "linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):
        os._exit(1)
