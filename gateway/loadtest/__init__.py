"""`novagate loadtest`: scripted voice users speaking protocol v1 against a gateway (docs/loadtest.md).

    script.py    the utterance as 20 ms frames, the microphone's clock, the turn plan (pure)
    state.py     one user's protocol state and per-turn measurements (pure)
    client.py    one user over asyncio + websockets
    runner.py    Options, run(): ramp, duration, progress, the summary
    metrics.py   the gateway's /metrics, scraped
    report.py    Summary: JSON, end-of-run text, HTML report (matplotlib, optional)
    command.py   `novagate loadtest` (arguments, output files)
    locustfile.py  the same user under Locust (gevent + websockets.sync)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .report import Summary
    from .runner import Options, run

__all__ = ["Options", "Summary", "run"]


def __getattr__(name: str):
    """Loaded on first use: `novagate` reads this package's command line without loading the tool."""
    if name == "Summary":
        from .report import Summary

        return Summary
    if name in ("Options", "run"):
        from . import runner

        return getattr(runner, name)
    raise AttributeError(name)
