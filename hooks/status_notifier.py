"""Tell a channel when an observation request reaches a state worth knowing.

``observation.status_changed`` to one of ``states`` (default: the final ones,
completed / failed / expired / cancelled, plus a request that re-opened),
``observation.failed`` (tomd gave up submitting) and ``observation.rejected``
(the facility refused it) each send one message to ``channel`` (default
"log"). Settings: ``[hooks.settings.status_notifier]``.
"""

from __future__ import annotations

from tomd.hooks import on

DEFAULT_STATES = ("completed", "failed", "expired", "cancelled")


@on("observation.status_changed", "observation.failed", "observation.rejected")
def tell(ctx):
    ev = ctx.event
    cfg = ctx.settings
    who = ctx.target.name if ctx.target else f"request {ev.name}"
    if ev.kind == "observation.status_changed":
        if ev.new_state not in cfg.get("states", DEFAULT_STATES) and not ev.reopened:
            return
        subject = f"{who}: {ev.facility} request {ev.name} is {ev.new_state}" + (" again" if ev.reopened else "")
        text = f"{ev.old_state} → {ev.new_state}" + (f" ({ev.facility_state})" if ev.facility_state else "")
        level = "warning" if ev.new_state in ("failed", "expired") else "info"
    elif ev.kind == "observation.failed":
        subject, text, level = f"{who}: request {ev.name} could not be submitted", ev.reason, "error"
    else:
        subject, text, level = f"{who}: {ev.facility} rejected request {ev.name}", ev.reason, "warning"
    ctx.notify(cfg.get("channel", "log"), subject, text, level=level,
               fields=[("facility", ev.facility), ("request", ev.name)])
