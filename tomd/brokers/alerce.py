"""ALeRCE ZTF API: objects whose last detection falls in the window.

Protocol (``https://api.alerce.online/ztf/v1``, as the ``alerce`` client uses it)::

    GET /objects?lastmjd=LO&lastmjd=HI&page=1&page_size=N&order_by=lastmjd&order_mode=ASC
                 [&classifier=lc_classifier&class=SNIa&probability=0.5 ...]
        → {"total", "page", "next", "has_next", "prev", "items": [{"oid", "meanra", "meandec",
            "firstmjd", "lastmjd", "ndet", "class", "classifier", "probability", ...}]}
    GET /objects/{oid}/lightcurve → {"detections": [...], "non_detections": [...]}

The window filters both ways (``lastmjd`` between its edges), so a full page
splits the window instead of paging: pages of a changing list could skip an
object, a time window cannot. The alert key is ``oid@lastmjd``: an object seen
again with a new detection is a new alert; seen again unchanged, nothing, and
its light curve is not even fetched.
"""

from __future__ import annotations

import threading

from tomd.alerts.formats.alerce_api import alert_key
from tomd.brokers.http import BrokerHttp
from tomd.brokers.poll import Item, Page, Window, jsonb, utc_mjd
from tomd.errors import PermanentError

DEFAULT_URL = "https://api.alerce.online/ztf/v1"


class ALeRCE:
    name = "alerce"
    default_overlap_s = 6 * 3600.0  # ALeRCE's pipeline delay, with margin; re-listing is cheap
    splits = True
    pages = True  # within a window under a second (one ZTF exposure can hold many objects)

    def __init__(self, stream):
        self.base = (stream.url or DEFAULT_URL).rstrip("/")
        self.page_size = stream.page_size
        self.query = dict(stream.query)

    def fetch(self, http: BrokerHttp, window: Window, page: int, stop: threading.Event) -> Page:
        params = [(k, _text(v)) for k, v in self.query.items() if not isinstance(v, list)]
        params += [(k, _text(x)) for k, v in self.query.items() if isinstance(v, list) for x in v]
        params += [("lastmjd", f"{utc_mjd(window.start):.6f}"), ("lastmjd", f"{utc_mjd(window.end):.6f}"),
                   ("page", str(page)), ("page_size", str(self.page_size)),
                   ("order_by", "lastmjd"), ("order_mode", "ASC")]
        body = http.call("GET", f"{self.base}/objects", stop, params=params)
        if not isinstance(body, dict) or not isinstance(body.get("items"), list):
            raise PermanentError("alerce: /objects answer has no items list")
        rows = body["items"]
        items = []
        for row in rows:
            key = alert_key(row) if isinstance(row, dict) else None
            # The key names the version (oid@lastmjd): a dead letter of one is not the next one's.
            label = f"objects/{key or (row.get('oid') if isinstance(row, dict) else '?')}"
            items.append(Item(label, source="alerce" if key else None, key=key, hit=row))
        more = bool(body.get("has_next")) or len(rows) >= self.page_size
        return Page(items, more=more)

    def detail(self, http: BrokerHttp, item: Item, stop: threading.Event) -> bytes:
        row = item.hit
        if not isinstance(row, dict) or not row.get("oid"):
            return jsonb({"object": row})  # the parser dead-letters it with its reason
        try:
            lc = http.call("GET", f"{self.base}/objects/{row['oid']}/lightcurve", stop)
        except PermanentError as exc:
            return jsonb({"object": row, "_error": str(exc)})
        if not isinstance(lc, dict):
            lc = {}
        return jsonb({"object": row, "detections": lc.get("detections") or [],
                      "non_detections": lc.get("non_detections") or []})


def _text(v: object) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)
