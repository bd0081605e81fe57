"""The access log: one logfmt line per call on the ``reaas.access`` logger, written when the call ends.

    rpc=Feature key=alice code=OK ms=12.41 images=256 answered=256 request_bytes=802833 response_bytes=65551 peer=ipv4:127.0.0.1:51234

logfmt (``name=value``; a value holding whitespace, a quote, a backslash or ``=`` is written as a JSON string, so
no value can break the line or forge a field) because it stays one short line a person reads in a terminal and
``grep code=RESOURCE_EXHAUSTED`` finds, while Loki, Vector and friends parse it into fields as they would JSON.
The caller is named by its account (the key's name, or "anonymous"), never by its key. ``images`` and ``answered``
count queries: a text request's token sequences count there as images do (the field keeps its name for the log
readers that already parse it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re

from reaas_server.interceptors import ANONYMOUS, api_key_of

ACCESS_LOG = logging.getLogger("reaas.access")
_NEEDS_QUOTES = re.compile(r'[\s"=\\]|^$')


def key_label(metadata: tuple | None) -> str:
    """Who called, for a call refused before its key was checked (the account's name is logged otherwise): safe
    to log, "anonymous" without an ``x-api-key``, else "key:" and 8 hex digits of the key's SHA-256 — enough to
    tell callers apart and to match a key one holds, not to recover it."""
    key = api_key_of(metadata)
    if key == ANONYMOUS:
        return ANONYMOUS
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:8]


def _value(value: object) -> str:
    text = str(value)
    return json.dumps(text) if _NEEDS_QUOTES.search(text) else text


def access_line(**fields: object) -> str:
    """``name=value`` pairs in the order given."""
    return " ".join(f"{name}={_value(value)}" for name, value in fields.items())
