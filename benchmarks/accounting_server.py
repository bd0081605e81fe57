"""A server child for bench-service's accounting-overhead A/B: the real server with its ledger on disk, or the
same server without metrics, keys and ledger (``--accounting off``). Prints the CLI's handshake line, then
serves until killed."""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

from reaas_server import ServerConfig, start_server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--accounting", choices=("on", "off"), required=True)
    parser.add_argument("--ledger", type=Path, required=True, help="ledger file (used with --accounting on)")
    args = parser.parse_args(argv)
    running = start_server(ServerConfig(port=0, ledger_path=args.ledger, bound_cost_budget_s=0.0),
                           accounting=args.accounting == "on")
    print(f"reaas-server listening on 127.0.0.1:{running.port} accounting={args.accounting}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
