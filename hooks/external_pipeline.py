"""Run an external program (your reduction pipeline) on every new data product.

``command`` is a list of arguments; ``{path}`` becomes a local copy of the
product (fetched from the store, local or S3, and removed afterwards),
``{filename}``, ``{target}``, ``{facility}``, ``{kind}``, ``{event_id}`` what
they say. Only these placeholders are replaced: any other text, braces included
(``awk '{print $1}'``), reaches the program as written. Without ``command`` in ``[hooks.settings.external_pipeline]`` the
environment variable ``TOMD_PIPELINE_CMD`` (split like a shell would) is used;
with neither, the hook does nothing.

The program runs with a timeout (``timeout``, default 600 s; keep the hook's
own timeout longer) and is killed when it overruns. A non-zero exit raises,
so tomd retries it with backoff and finally records it failed with the
program's last lines of stderr. Only products of ``kinds`` (default
["image"]) are passed on; ``tag`` tags the target when the program succeeds.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess

from tomd.hooks import on


@on("data.stored", timeout="30m", max_attempts=3)
def reduce(ctx):
    ev = ctx.event
    cfg = ctx.settings
    command = list(cfg.get("command") or shlex.split(os.environ.get("TOMD_PIPELINE_CMD", "")))
    if not command:
        ctx.log.debug("no command configured: nothing to do")
        return
    if ev.product_kind not in cfg.get("kinds", ["image"]):
        return
    target = ctx.target.name if ctx.target else ""
    with ctx.local_copy(ev.storage_key) as path:
        values = {"path": path, "filename": ev.filename, "target": target, "facility": ev.facility,
                  "kind": ev.product_kind, "event_id": ctx.event_id}
        args = [expand(a, values) for a in command]
        try:
            proc = subprocess.run(args, capture_output=True, text=True, timeout=float(cfg.get("timeout", 600)),
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{args[0]} ran longer than {cfg.get('timeout', 600)} s and was killed") from None
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-10:])
        raise RuntimeError(f"{args[0]} exited with status {proc.returncode}: {tail}")
    for line in proc.stdout.strip().splitlines()[-5:]:
        ctx.log.info("%s: %s", args[0], line)
    if cfg.get("tag") and ev.target_id is not None:
        ctx.tag(cfg["tag"])


_PLACEHOLDER = re.compile(r"\{(path|filename|target|facility|kind|event_id)\}")


def expand(arg, values: dict) -> str:
    """``arg`` with the documented placeholders filled; other braces stay (not str.format)."""
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), str(arg))
