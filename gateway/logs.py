"""Structured JSON logs, one object per line. Transcripts and tokens stay out unless asked for; so do
query strings in uvicorn's request and WebSocket lines."""

from __future__ import annotations

import logging
import sys
import time

import orjson

_REDACTED_KEYS = frozenset({"text", "transcript", "token", "resume_token", "receipt", "auth"})
_show_text = False


class StripQuery(logging.Filter):
    """uvicorn names the request path with its query string (`"WebSocket /v1/voice?…" [accepted]`, access
    lines, errors), where a client may have put a token: keep the path, drop the query."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("uvicorn") and isinstance(record.args, tuple):
            record.args = tuple(_path_only(a) for a in record.args)
        return True


def _path_only(arg):
    return arg.split("?", 1)[0] if isinstance(arg, str) and arg.startswith("/") else arg


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            for k, v in fields.items():
                entry[k] = "[redacted]" if (k in _REDACTED_KEYS and not _show_text) else v
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def setup(level: str = "info", *, show_text: bool = False) -> None:
    global _show_text
    _show_text = show_text
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter())
    handler.addFilter(StripQuery())  # on the handler: it sees the records uvicorn's loggers pass up
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    logging.getLogger("uvicorn.access").setLevel("WARNING")


def log(logger: logging.Logger, level: int, msg: str, *, exc_info: bool = False, **fields) -> None:
    """The gateway's one way to log: a fixed `msg` (no transcripts or tokens in it) and the details as
    `fields`, which become keys of the JSON line (redacted when their key says they hold text or a
    token). `exc_info=True` adds the traceback of the exception being handled."""
    if logger.isEnabledFor(level):
        logger.log(level, msg, exc_info=exc_info, extra={"fields": fields})
