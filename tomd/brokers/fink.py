"""Fink API: the latest alerts of a class, in the window.

Protocol (``https://api.fink-portal.org``)::

    POST /api/v1/latests  {"class": "Early SN Ia candidate", "n": N,
                           "startdate": "YYYY-MM-DD HH:MM:SS", "stopdate": "...",
                           "output-format": "json" [, "columns": "..."]}
        → [{"i:candid", "i:objectId", "i:ra", "i:dec", "i:jd", "i:magpsf", "i:sigmapsf",
            "i:fid", "d:...", "v:classification", ...}, ...]

``latests`` has no pages: at most ``n`` alerts come back, so a full answer
splits the window in halves until each half holds fewer. The alert key is
the ZTF ``candid``, under the source ``fink`` — the same key Fink's Kafka
stream gives, so an alert seen on both is stored once.
"""

from __future__ import annotations

import threading

from tomd.brokers.http import BrokerHttp
from tomd.brokers.poll import Item, Page, Window, as_utc_text, jsonb
from tomd.errors import PermanentError

DEFAULT_URL = "https://api.fink-portal.org"


class Fink:
    name = "fink"
    default_overlap_s = 3600.0  # Fink's processing delay, with margin
    splits = True
    pages = False  # latests returns at most n; no offset

    def __init__(self, stream):
        self.base = (stream.url or DEFAULT_URL).rstrip("/")
        self.page_size = stream.page_size
        self.query = dict(stream.query)
        if "class" not in self.query:
            self.query["class"] = "allclasses"

    def fetch(self, http: BrokerHttp, window: Window, page: int, stop: threading.Event) -> Page:
        body = {**self.query, "n": self.page_size, "startdate": as_utc_text(window.start),
                "stopdate": as_utc_text(window.end), "output-format": "json"}
        rows = http.call("POST", f"{self.base}/api/v1/latests", stop, json=body)
        if isinstance(rows, dict) and not rows:
            rows = []  # an empty pandas frame as JSON
        if not isinstance(rows, list):
            raise PermanentError(f"fink: latests answered {type(rows).__name__}, expected a list of alerts")
        items = []
        for i, row in enumerate(rows):
            candid = row.get("i:candid") if isinstance(row, dict) else None
            key = str(candid) if candid is not None else None
            items.append(Item(f"latests/{key or i}", value=jsonb(row), source="fink" if key else None, key=key))
        return Page(items, more=len(rows) >= self.page_size)

    def detail(self, http: BrokerHttp, item: Item, stop: threading.Event) -> bytes:
        assert item.value is not None  # rows come whole
        return item.value
