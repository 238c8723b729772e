"""Stage 3, rules: rule files written by scientists decide what to observe.

::

    load.py     TOML files → validated ``Rule`` objects (every problem as FILE:LINE:COL)
    expr.py     the ``when`` language: a whitelisted subset of Python expressions,
                compiled once into a plain Python function
    context.py  what an expression reads: the alert, the target and its light-curve
                features, ``now``, visibility (pure functions)
    engine.py   evaluation, limits, duplicates, decisions and submission intents
                (an ``AlertSink`` run inside the ingest transaction)
    cli.py      ``tomd rule check | explain | backtest``
"""
