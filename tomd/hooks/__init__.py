"""Hooks: scientists' Python code run on tomd's events, durably and in isolation.

Write a file in ``hooks/`` (or any directory in ``[hooks] paths``)::

    from tomd.hooks import on

    @on("data.stored", timeout="5m", max_attempts=3)
    def check_image(ctx):
        if ctx.event.product_kind == "image":
            with ctx.open_product(ctx.event.storage_key) as fh:
                ...
            ctx.tag("needs-look")

    @on("observation.status_changed")
    async def tell_us(ctx):                      # async works too
        ctx.notify("slack-transients", f"{ctx.target.name}: {ctx.event.new_state}")

Each decorated function is one hook, named ``<file stem>.<function>``; one
function may take several kinds, several hooks may take one kind, ``"*"``
takes all. Hooks run in a worker process (a hang is killed after its timeout,
a crash costs one attempt, never the daemon); each (hook, event) that
succeeds is recorded and never runs again; failures are retried with
backoff, then recorded ``failed`` with the traceback. See
:mod:`tomd.hooks.api` for what ``ctx`` offers and :mod:`tomd.hooks.runner`
for the delivery rules. Commands: ``tomd hook list | run | runs | retry``.
"""

from tomd.hooks.api import HookContext, ObservationInfo, Point, ProductInfo, TargetSnapshot
from tomd.hooks.registry import HookSpec, Registry, load_hooks, on

__all__ = ["HookContext", "HookRunner", "HookSpec", "ObservationInfo", "Point", "ProductInfo", "Registry",
           "TargetSnapshot", "load_hooks", "on"]


def __getattr__(name: str):
    # The runner (SQLAlchemy, multiprocessing) is imported only by the daemon, not by hook files.
    if name in ("HookRunner", "RunnerSettings"):
        from tomd.hooks import runner

        return getattr(runner, name)
    raise AttributeError(name)
