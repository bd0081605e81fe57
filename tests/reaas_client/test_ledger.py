"""QueryLedger: exact per-input counts, bytes shared fairly, safe under concurrent recording."""

from __future__ import annotations

import threading

from reaas_client import QueryLedger


def test_each_image_is_one_query_and_bytes_are_shared():
    ledger = QueryLedger()
    ledger.record("StreamFeatures", ["t7", "t7", "t7", "t8"], request_bytes=400, response_bytes=40)
    ledger.record("F2IPerturb", ["t7"], request_bytes=100, response_bytes=10)
    assert ledger.queries("t7") == 4 and ledger.queries("t7", "F2IPerturb") == 1
    assert ledger.queries("t8") == 1 and ledger.queries("nobody") == 0
    assert ledger.bytes("t7") == (400, 40)
    assert ledger.bytes("t8") == (100, 10)
    assert ledger.totals_by_rpc()["StreamFeatures"].queries == 4


def test_concurrent_recording_loses_nothing():
    ledger = QueryLedger()

    def work():
        for _ in range(1000):
            ledger.record("Feature", ["x"], 1, 1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert ledger.queries("x") == 4000
