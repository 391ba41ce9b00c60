"""Sales calls: a small MCP server a voice assistant uses to record a rep's calls to doctors and read
them back. Stdio by default (the gateway starts it: examples/sales_calls/mcp.json); `--http PORT`
serves streamable HTTP on 127.0.0.1:PORT/mcp instead, for a server that outlives the gateway.

The calls live in their own SQLite file, `SALES_CALLS_DB` (default var/sales_calls.sqlite3, relative
to the working directory). One file for everybody: every user of the gateway sees every call, which
suits a demo; a real server would scope the calls by user."""

from __future__ import annotations

import argparse
import os
import sqlite3
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

from mcp.server.mcpserver import MCPServer
from pydantic import BaseModel, Field

mcp = MCPServer("sales-calls", instructions="Record a sales rep's calls to doctors and list them.")


class Call(BaseModel):
    id: int
    doctor: str
    product: str
    when: str
    notes: str
    recorded_at: str


class Calls(BaseModel):
    calls: list[Call]


def _db() -> sqlite3.Connection:
    """A connection per call: tools may run on any thread, and the file is opened only when used."""
    path = Path(os.environ.get("SALES_CALLS_DB", "var/sales_calls.sqlite3"))
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE IF NOT EXISTS calls (id INTEGER PRIMARY KEY, doctor TEXT NOT NULL, product TEXT NOT NULL, "
        "happened TEXT NOT NULL, notes TEXT NOT NULL DEFAULT '', recorded_at TEXT NOT NULL)"
    )
    return db


# The docstring is the tool's description and each Field's the parameter's: what the model reads.
@mcp.tool()
def record_call(
    doctor: Annotated[str, Field(description='The doctor\'s name, as the user said it (e.g. "Dr. Smith")')],
    product: Annotated[str, Field(description="The product discussed")],
    when: Annotated[str, Field(description='When the call happened, as the user said it (e.g. "today at 2 pm")')],
    notes: Annotated[str, Field(description="Anything else worth keeping: follow-ups, objections, samples "
                                "left")] = "",
) -> Call:
    """Record a sales call to a doctor, once the user has said who, which product and when."""
    recorded_at = datetime.now(UTC).isoformat(timespec="seconds")
    with closing(_db()) as db, db:
        cursor = db.execute(
            "INSERT INTO calls (doctor, product, happened, notes, recorded_at) VALUES (?, ?, ?, ?, ?)",
            (doctor, product, when, notes, recorded_at),
        )
        call_id = cursor.lastrowid
    return Call(id=call_id, doctor=doctor, product=product, when=when, notes=notes, recorded_at=recorded_at)


@mcp.tool()
def list_calls(
    doctor: Annotated[str | None, Field(description="Only the calls to this doctor (part of the name is "
                                        "enough)")] = None,
    limit: Annotated[int, Field(description="At most this many calls (1 to 100)")] = 10,
) -> Calls:
    """List recorded sales calls, newest first."""
    limit = max(1, min(limit, 100))
    query = "SELECT id, doctor, product, happened, notes, recorded_at FROM calls"
    params: tuple = ()
    if doctor:
        query += " WHERE doctor LIKE ?"
        params = (f"%{doctor}%",)
    with closing(_db()) as db:
        rows = db.execute(query + " ORDER BY id DESC LIMIT ?", (*params, limit)).fetchall()
    return Calls(calls=[Call(id=r[0], doctor=r[1], product=r[2], when=r[3], notes=r[4], recorded_at=r[5])
                        for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--http", type=int, metavar="PORT", help="serve streamable HTTP on 127.0.0.1:PORT/mcp")
    args = parser.parse_args()
    if args.http:
        mcp.run("streamable-http", host="127.0.0.1", port=args.http)
    else:
        mcp.run()


if __name__ == "__main__":
    main()
