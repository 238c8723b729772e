"""TNS (Transient Name Server): objects reported or changed since the cursor.

Protocol (TNS API, bots): every call is a form POST with ``api_key`` and a
JSON ``data`` field, and the bot's ``tns_marker`` as User-Agent::

    POST /api/get/search  data={"public_timestamp": "YYYY-MM-DD HH:MM:SS", "num_page": N, "page": k, ...}
         → {"id_code": 200, "data": {"reply": [{"objname", "prefix", "objid"}, ...]}}
    POST /api/get/object  data={"objname": "2024abc", "photometry": "1"}
         → {"id_code": 200, "data": {"reply": {"objname", "name_prefix", "radeg", "decdeg",
                                              "discoverydate", "internal_names", "photometry": [...], ...}}}

(Newer answers put the list or object directly in ``data``; both are read.)
``public_timestamp`` selects objects made public or modified after it, so the
search has no upper bound and pages instead of splitting. Rate limits: TNS
answers 429 and sends ``x-rate-limit-*`` / ``x-cone-rate-limit-*`` headers
with the seconds to the reset; ``BrokerHttp`` waits them out.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from tomd.brokers.http import BrokerHttp
from tomd.brokers.poll import Item, Page, Window, as_utc_text, jsonb
from tomd.errors import PermanentError, RetryableError

DEFAULT_URL = "https://www.wis-tns.org"


class TNS:
    name = "tns"
    default_overlap_s = 600.0  # public_timestamp is TNS's clock; ten minutes of slack
    splits = False  # public_timestamp is a lower bound only
    pages = True

    def __init__(self, stream):
        self.base = (stream.url or DEFAULT_URL).rstrip("/")
        self.api_key = stream.api_key
        self.page_size = stream.page_size
        self.query = dict(stream.query)
        self.headers = {
            "User-Agent": "tns_marker" + json.dumps({"tns_id": str(stream.bot_id), "type": "bot",
                                                     "name": stream.bot_name}),
        }

    def _form(self, data: dict[str, Any]) -> dict[str, str]:
        return {"api_key": self.api_key.reveal() if self.api_key else "", "data": json.dumps(data)}

    def fetch(self, http: BrokerHttp, window: Window, page: int, stop: threading.Event) -> Page:
        search = {**self.query, "public_timestamp": as_utc_text(window.start),
                  "num_page": str(self.page_size), "page": str(page - 1)}
        body = http.call("POST", f"{self.base}/api/get/search", stop, data=self._form(search))
        hits = reply(body, "search")
        if not isinstance(hits, list):
            raise PermanentError(f"tns: search answered {type(hits).__name__}, expected a list")
        items = [Item(f"object/{h['objname']}", hit=h) for h in hits]
        # Read until an empty page: TNS may cap num_page below page_size, and a short
        # page taken for the last one would drop the rest (one more search per poll).
        return Page(items, more=bool(hits))

    def detail(self, http: BrokerHttp, item: Item, stop: threading.Event) -> bytes:
        objname = item.hit["objname"]
        try:
            body = http.call("POST", f"{self.base}/api/get/object", stop,
                             data=self._form({"objname": objname, "photometry": "1", "spectra": "0"}))
            obj = reply(body, "object")
        except PermanentError as exc:
            # One object TNS will not give (withdrawn, renamed): dead-letter it, keep the rest.
            return jsonb({"objname": objname, "_error": str(exc)})
        return jsonb(obj)


def reply(body: Any, what: str) -> Any:
    """The ``reply`` of a TNS answer (old: data.reply; new: data), checking ``id_code``."""
    if not isinstance(body, dict):
        raise PermanentError(f"tns: {what} answer is {type(body).__name__}, not an object")
    code = body.get("id_code")
    if code is not None and str(code) != "200":
        msg = f"tns: {what}: {code} {body.get('id_message', '')}".strip()
        if str(code) == "429" or str(code).startswith("5"):
            raise RetryableError(msg)
        raise PermanentError(msg)
    data = body.get("data")
    if isinstance(data, dict) and "reply" in data:
        return data["reply"]
    return data
