"""Broker queries for services without a stream: TNS, ALeRCE, Fink (REST).

A ``kind = "poll"`` stream asks a REST API every ``interval`` for what is new
since its cursor and feeds each result, as bytes, through the same
``Ingestor`` as the Kafka and file streams (same parsers registry, same
dead letters, same per-source keys, so a replay changes nothing)::

    PollStream.run(stop)
      every interval:  window = [cursor - overlap, now]
        service.fetch(window) ─► items ─► PollMessage(bytes) at "tns:object/2024abc"
                                             │
                                             ▼
                                 Ingestor.handle(batch)  (one transaction)
                                             │ committed
                                             ▼
                                 save cursor = window end   (poll_state "broker:<stream>")

One module per service (``tns``, ``alerce``, ``fink``) knows its protocol;
``poll`` holds the loop and ``http`` the bounded HTTP calls (timeouts,
backoff on 429/5xx honouring Retry-After and TNS's rate-limit headers).
The parsers are formats ``tns-api``, ``alerce-api``, ``fink-api`` in
``tomd.alerts.formats``.

This package imports nothing heavy at import time: the config validator asks
:func:`owned_query_keys`.
"""

from __future__ import annotations

# Query parameters the poller sets itself (from the cursor and page_size); a
# config that sets them would silently fight the cursor.
_OWNED = {
    "tns-api": frozenset({"public_timestamp", "page", "num_page"}),
    "alerce-api": frozenset({"lastmjd", "page", "page_size", "order_by", "order_mode", "count"}),
    "fink-api": frozenset({"startdate", "stopdate", "n", "output-format"}),
}


def owned_query_keys(fmt: object) -> frozenset[str]:
    return _OWNED.get(fmt, frozenset())  # type: ignore[arg-type]


def __getattr__(name: str):
    # ``from tomd.brokers import PollStream`` without importing httpx for config checks.
    if name in ("PollStream", "PollStats"):
        from tomd.brokers import poll

        return getattr(poll, name)
    raise AttributeError(name)
