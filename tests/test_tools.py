"""Tools (gateway/tools): MCP servers over stdio and streamable HTTP, Python functions, names, errors,
cancellation. Real server processes and the real MCP SDK; no timing assertions, every wait bounded."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest

from gateway.cli import main as cli_main
from gateway.config import ConfigError, Settings
from gateway.tools import EMPTY, ToolBox, ToolSetupError, open_toolbox
from gateway.tools.results import success
from gateway.tools.spec import SourceTool

ROOT = Path(__file__).resolve().parent.parent
TEST_SERVER = str(ROOT / "tests" / "mcp_test_server.py")
EXAMPLE_SERVER = str(ROOT / "examples" / "sales_calls" / "server.py")
FIXTURE = "tests.tools_fixture"
CALL_BOUND_S = 30.0  # generous: a slow machine; nothing here is expected to take long

pytestmark = pytest.mark.timeout(120)


def write_config(tmp_path: Path, servers: dict) -> str:
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"mcpServers": servers}))
    return str(path)


def stdio(script: str, **extra) -> dict:
    return {"command": sys.executable, "args": [script], **extra}


async def call(box: ToolBox, name: str, arguments) -> tuple[bool, dict]:
    result = await asyncio.wait_for(box.call(name, arguments), CALL_BOUND_S)
    return result.ok, json.loads(result.content)


def error_of(value: dict) -> tuple[str, str]:
    return value["error"]["type"], value["error"]["message"]


async def wait_for_file(path: Path) -> None:
    deadline = time.monotonic() + CALL_BOUND_S
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        await asyncio.sleep(0.02)


async def cancel_in_flight(box: ToolBox, marker: Path) -> None:
    """Cancel a call the server is running (it said so), and see the server cancel it too."""
    task = asyncio.create_task(box.call("slow", {"seconds": 60, "marker": str(marker)}))
    await wait_for_file(marker.with_suffix(".started"))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for_file(marker.with_suffix(".cancelled"))  # notifications/cancelled reached the tool


# -- Python tools


async def test_python_tool_schema_comes_from_hints_and_docstring():
    box = await open_toolbox(mcp_config=None, python_tools=f"{FIXTURE}:TOOLS")
    assert [s.name for s in box.specs] == ["add_visit", "lookup_product", "echo", "json_string", "which_thread",
                                           "broken"]
    spec = box.get("add_visit")
    assert spec.description == "Record a visit to a doctor."
    assert (spec.source, spec.public) == (f"python:{FIXTURE}", False)
    schema = spec.input_schema
    assert schema["type"] == "object" and schema["required"] == ["doctor"]
    assert schema["additionalProperties"] is False
    props = schema["properties"]
    assert list(props) == ["doctor", "minutes", "tags", "kind"]
    assert props["doctor"] == {"type": "string", "description": "The doctor's full name."}
    assert props["minutes"] == {"type": "integer", "default": 15, "description": "How long the visit took, in minutes."}
    assert props["tags"]["description"] == "Free labels."
    assert {"type": "array", "items": {"type": "string"}} in props["tags"]["anyOf"]
    assert props["kind"]["enum"] == ["in person", "phone"]
    assert "title" not in json.dumps(schema)  # pydantic's titles are dropped
    assert box.get("lookup_product").public is True
    assert box.get("lookup_product").description == "Look up a product's price."
    assert box.get("which_thread").input_schema == {"type": "object", "properties": {},
                                                     "additionalProperties": False}
    assert box.get("nope") is None
    await box.aclose()


async def test_python_tools_run_and_convert_results():
    box = await open_toolbox(mcp_config=None, python_tools=f"{FIXTURE}:TOOLS")
    assert await call(box, "add_visit", {"doctor": "Dr. Smith", "minutes": "20"}) == (
        True, {"doctor": "Dr. Smith", "minutes": 20, "tags": []})  # validated, coerced, a dataclass out
    assert await call(box, "lookup_product", {"name": "Cardiozen"}) == (True, {"name": "Cardiozen", "price": 12.5})
    assert await call(box, "echo", {"text": "hello"}) == (True, {"result": "hello"})
    assert await call(box, "json_string", {}) == (True, {"already": "json"})
    assert await call(box, "echo", '{"text": "as JSON text"}') == (True, {"result": "as JSON text"})
    ok, value = await call(box, "which_thread", None)
    assert ok and value["result"] != threading.current_thread().name  # a plain function runs off the loop

    ok, value = await call(box, "broken", {"x": 3})
    assert not ok and error_of(value) == ("tool_error", "ValueError: no luck with 3")
    await box.aclose()


@pytest.mark.parametrize("arguments, needle", [
    ({}, "doctor: Field required"),
    ({"doctor": "A", "minutes": "lots"}, "minutes:"),
    ({"doctor": "A", "kind": "email"}, "kind:"),
    ({"doctor": "A", "colour": "red"}, "colour: Extra inputs are not permitted"),
    ([1, 2], "must be a JSON object"),
    ("{not json", "not valid JSON"),
])
async def test_python_tool_bad_arguments_name_the_problem(arguments, needle):
    box = await open_toolbox(mcp_config=None, python_tools=f"{FIXTURE}:add_visit")
    assert [s.name for s in box.specs] == ["add_visit"]
    ok, value = await call(box, "add_visit", arguments)
    kind, message = error_of(value)
    assert not ok and kind == "invalid_arguments" and needle in message, message


async def test_unknown_tool_is_an_error_result():
    ok, value = await call(EMPTY, "anything", {})
    assert not ok and error_of(value)[0] == "unknown_tool"


@pytest.mark.parametrize("spec, needle", [
    ("no_such_module_here:TOOLS", "cannot import 'no_such_module_here'"),
    (f"{FIXTURE}:NOPE", "has no attribute 'NOPE'"),
    (FIXTURE, "must be package.module:attribute"),
])
async def test_python_tool_setup_errors(spec, needle):
    with pytest.raises(ToolSetupError, match=re.escape(needle)):
        await open_toolbox(mcp_config=None, python_tools=spec)


def test_nova_tools_shape():
    assert EMPTY.specs == () and EMPTY.nova_tools() == [] and ToolBox().summary() == []
    box = asyncio.run(open_toolbox(mcp_config=None, python_tools=f"{FIXTURE}:TOOLS"))
    tools = box.nova_tools()
    assert len(tools) == len(box.specs)
    for entry, spec in zip(tools, box.specs):
        assert set(entry) == {"toolSpec"}
        assert set(entry["toolSpec"]) == {"name", "description", "inputSchema"}
        assert (entry["toolSpec"]["name"], entry["toolSpec"]["description"]) == (spec.name, spec.description)
        assert isinstance(entry["toolSpec"]["inputSchema"]["json"], str)  # a JSON string, as Nova wants
        assert json.loads(entry["toolSpec"]["inputSchema"]["json"]) == spec.input_schema
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", spec.name)
    tools[0]["toolSpec"]["name"] = "changed"  # a copy: the box's own stays
    assert box.nova_tools()[0]["toolSpec"]["name"] == "add_visit"


def test_a_name_still_taken_after_prefixing_is_a_setup_error():
    def tool(name, prefix, source):
        return SourceTool(name=name, description="d", input_schema={"type": "object"}, public=False,
                          source=source, prefix=prefix, invoke=lambda args: asyncio.sleep(0, success({})))

    box = ToolBox([tool("find", "a", "mcp:a"), tool("find", "b", "mcp:b"), tool("a.find", "c", "mcp:c")])
    assert [(s.name, s.source) for s in box.specs] == [("find", "mcp:a"), ("b_find", "mcp:b"), ("a_find", "mcp:c")]
    with pytest.raises(ToolSetupError, match="'find' of mcp:b2 clashes"):
        ToolBox([tool("find", "a", "mcp:a"), tool("find", "b", "mcp:b"), tool("find", "b", "mcp:b2")])


# -- MCP servers


async def test_example_sales_calls_server_over_stdio(tmp_path):
    db = tmp_path / "calls.sqlite3"
    config = write_config(tmp_path, {"sales_calls": stdio(EXAMPLE_SERVER, env={"SALES_CALLS_DB": str(db)},
                                                          public=["record_call"])})
    box = await open_toolbox(mcp_config=config, python_tools=None)
    try:
        assert {s.name: (s.source, s.public) for s in box.specs} == {
            "record_call": ("mcp:sales_calls", True), "list_calls": ("mcp:sales_calls", False)}
        schema = box.get("record_call").input_schema
        assert schema["required"] == ["doctor", "product", "when"] and "notes" in schema["properties"]
        ok, recorded = await call(box, "record_call", {"doctor": "Dr. Smith", "product": "Cardiozen",
                                                       "when": "today at 2 pm"})
        assert ok and (recorded["doctor"], recorded["product"], recorded["notes"]) == ("Dr. Smith", "Cardiozen", "")
        await call(box, "record_call", {"doctor": "Dr. Jones", "product": "Neurolax", "when": "Monday",
                                        "notes": "wants samples"})
        ok, listed = await call(box, "list_calls", {"doctor": "smith"})
        assert ok and [(c["id"], c["doctor"], c["when"]) for c in listed["calls"]] == [
            (recorded["id"], "Dr. Smith", "today at 2 pm")]
        ok, listed = await call(box, "list_calls", {})
        assert [c["doctor"] for c in listed["calls"]] == ["Dr. Jones", "Dr. Smith"]  # newest first
    finally:
        await box.aclose()
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT count(*) FROM calls").fetchone() == (2,)


async def test_mcp_stdio_results_errors_cancellation_and_restart(tmp_path):
    box = await open_toolbox(mcp_config=write_config(tmp_path, {"test": stdio(TEST_SERVER, public=True)}),
                             python_tools=None)
    try:
        assert all(s.public and s.source == "mcp:test" for s in box.specs)
        assert "notes_add" in {s.name for s in box.specs}  # "notes.add": sanitized for Nova
        # results: plain text, JSON text, structured output
        assert await call(box, "echo", {"text": "hi"}) == (True, {"content": ["hi"]})
        assert await call(box, "json_text", {}) == (True, {"a": 1, "b": [True, None]})
        assert await call(box, "weather", {"city": "Oslo"}) == (True, {"city": "Oslo", "celsius": 21.5})
        assert await call(box, "notes_add", {"text": "x"}) == (True, {"added": "x"})
        ok, value = await call(box, "pid", {})  # an int: the SDK's {"result": ...} structured output
        assert ok and isinstance(value["result"], int)
        # errors: the tool's own (isError), bad arguments (checked against the listed schema)
        ok, value = await call(box, "fail", {"reason": "because"})
        assert not ok and error_of(value)[0] == "tool_error" and "failed on purpose: because" in error_of(value)[1]
        ok, value = await call(box, "echo", {"text": 3})
        assert not ok and error_of(value) == ("invalid_arguments", "text: 3 is not of type 'string'")

        # cancellation, wherever the call is (queued, on its way, running): the session goes on
        for wait in (0.0, 0.3):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(box.call("slow", {"seconds": 60}), wait)
            assert await call(box, "echo", {"text": "still here"}) == (True, {"content": ["still here"]})
        await cancel_in_flight(box, tmp_path / "slow")
        assert await call(box, "echo", {"text": "still here"}) == (True, {"content": ["still here"]})
        slow = asyncio.create_task(box.call("slow", {"seconds": 0.2}))
        assert await call(box, "echo", {"text": "meanwhile"}) == (True, {"content": ["meanwhile"]})
        assert (await asyncio.wait_for(slow, CALL_BOUND_S)).ok  # concurrent calls on one session

        # the server dies: the call fails with a JSON error, the next call starts it again
        first_pid = (await call(box, "pid", {}))[1]["result"]
        ok, value = await call(box, "crash", {})
        assert not ok and error_of(value)[0] == "server_unavailable"
        ok, value = await call(box, "pid", {})
        assert ok and value["result"] != first_pid
        assert await call(box, "echo", {"text": "again"}) == (True, {"content": ["again"]})
    finally:
        await box.aclose()
    ok, value = await call(box, "echo", {"text": "closed"})
    assert not ok and error_of(value)[0] == "server_unavailable"


async def test_name_clash_prefixes_the_later_sources(tmp_path):
    config = write_config(tmp_path, {"test": stdio(TEST_SERVER), "my.server": stdio(TEST_SERVER, public=["echo"])})
    box = await open_toolbox(mcp_config=config, python_tools=f"{FIXTURE}:echo")
    try:
        sources = {s.name: (s.source, s.public) for s in box.specs}
        assert sources["echo"] == ("mcp:test", False)
        assert sources["my_server_echo"] == ("mcp:my.server", True)  # public names the server's own tool name
        assert sources["tools_fixture_echo"] == (f"python:{FIXTURE}", False)
        assert sources["notes_add"] == ("mcp:test", False) and "my_server_notes_add" in sources
        assert await call(box, "my_server_echo", {"text": "b"}) == (True, {"content": ["b"]})
        assert await call(box, "tools_fixture_echo", {"text": "py"}) == (True, {"result": "py"})
        lines = box.summary()
        assert len(lines) == len(box.specs)
        assert any(re.match(r"my_server_echo\(text\)\s+mcp:my\.server\s+public$", line) for line in lines)
    finally:
        await box.aclose()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def http_server():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, TEST_SERVER, "--http", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "the test MCP server exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the test MCP server did not listen"
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def test_mcp_over_streamable_http(tmp_path, http_server, monkeypatch):
    config = write_config(tmp_path, {"remote": {"url": http_server, "headers": {"X-Test": "${NOVAGATE_TEST_HDR}"}}})
    monkeypatch.delenv("NOVAGATE_TEST_HDR", raising=False)
    with pytest.raises(ToolSetupError, match=re.escape("${NOVAGATE_TEST_HDR} is not set")):
        await open_toolbox(mcp_config=config, python_tools=None)
    monkeypatch.setenv("NOVAGATE_TEST_HDR", "1")
    box = await open_toolbox(mcp_config=config, python_tools=None)
    try:
        assert {s.source for s in box.specs} == {"mcp:remote"} and box.get("weather")
        assert await call(box, "weather", {"city": "Rome"}) == (True, {"city": "Rome", "celsius": 21.5})
        ok, value = await call(box, "fail", {"reason": "remote"})
        assert not ok and error_of(value)[0] == "tool_error"
        await cancel_in_flight(box, tmp_path / "slow")
        assert await call(box, "echo", {"text": "after"}) == (True, {"content": ["after"]})
    finally:
        await box.aclose()


@pytest.mark.parametrize("server, timeout, needle", [
    ({"command": sys.executable, "args": ["-c", "import sys; sys.stderr.write('bad CRM password\\n'); sys.exit(3)"]},
     15, "bad CRM password"),  # the stderr tail says why
    ({"command": "/nonexistent/mcp-server"}, 15, "no such command or file: /nonexistent/mcp-server"),
    ({"command": sys.executable, "args": ["-c", "import time; time.sleep(60)"]}, 1,
     "did not list its tools within 1 s"),
    ({"url": f"http://127.0.0.1:{_free_port()}/mcp"}, 15, "failed to start"),
])
async def test_a_server_that_cannot_start_is_named(tmp_path, server, timeout, needle):
    config = write_config(tmp_path, {"crm": server})
    with pytest.raises(ToolSetupError) as caught:
        await open_toolbox(mcp_config=config, python_tools=None, startup_timeout_s=timeout)
    assert "MCP server 'crm'" in str(caught.value) and needle in str(caught.value), str(caught.value)


async def test_one_failing_server_stops_the_start_up(tmp_path):
    config = write_config(tmp_path, {"good": stdio(TEST_SERVER), "bad": {"command": "/nonexistent/mcp-server"}})
    with pytest.raises(ToolSetupError) as caught:
        await open_toolbox(mcp_config=config, python_tools=None)
    assert "MCP server 'bad'" in str(caught.value) and "'good'" not in str(caught.value)


@pytest.mark.parametrize("content, needle", [
    ("{nope", "is not valid JSON"),
    ('{"servers": {}}', '"mcpServers"'),
    ('{"mcpServers": {"x": {"command": "a", "url": "http://b"}}}', 'either "command"'),
    ('{"mcpServers": {"x": {"url": "ftp://b"}}}', "http:// or https://"),
    ('{"mcpServers": {"x": {"command": "a", "public": "yes"}}}', '"public" must be'),
    ('{"mcpServers": {"x": {"command": "a", "argz": []}}}', "unknown keys argz"),
    ('{"mcpServers": {"x": {"url": "http://b", "type": "sse"}}}', "SSE transport is not supported"),
])
async def test_mcp_config_errors(tmp_path, content, needle):
    path = tmp_path / "mcp.json"
    path.write_text(content)
    with pytest.raises(ToolSetupError, match=re.escape(needle)):
        await open_toolbox(mcp_config=str(path), python_tools=None)


async def test_disabled_servers_are_skipped(tmp_path):
    box = await open_toolbox(mcp_config=write_config(tmp_path, {"off": {"command": "x", "disabled": True}}),
                             python_tools=None)
    assert box.specs == ()


# -- settings and the command line


def test_tool_settings():
    s = Settings.from_env({"NOVAGATE_MCP_CONFIG": "m.json", "NOVAGATE_TOOLS": "a.b:C", "NOVAGATE_TOOL_TIMEOUT_S": "5"})
    assert (s.mcp_config, s.tools, s.tool_timeout_s) == ("m.json", "a.b:C", 5.0)
    assert Settings.from_env({}).tool_timeout_s == 20.0
    with pytest.raises(ConfigError, match="NOVAGATE_TOOL_TIMEOUT_S"):
        Settings.from_env({"NOVAGATE_TOOL_TIMEOUT_S": "0"})


@pytest.fixture
def no_tool_env(monkeypatch):
    """No tool settings from the environment; the root logger as it was (the command sets it up)."""
    for name in ("NOVAGATE_MCP_CONFIG", "NOVAGATE_TOOLS", "NOVAGATE_TOOL_TIMEOUT_S", "NOVAGATE_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_cli_tools_lists_and_calls(capsys, no_tool_env):
    assert cli_main(["tools", "--tools", f"{FIXTURE}:TOOLS"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("6 tools:\n")
    assert re.search(r"add_visit\(doctor, minutes\?, tags\?, kind\?\)\s+python:tests\.tools_fixture\s+private", out)
    assert re.search(r"lookup_product\(name\)\s+python:tests\.tools_fixture\s+public", out)

    assert cli_main(["tools", "--tools", f"{FIXTURE}:TOOLS", "--call", "lookup_product", "--args",
                     '{"name": "X"}']) == 0
    assert json.loads(capsys.readouterr().out) == {"name": "X", "price": 12.5}
    assert cli_main(["tools", "--tools", f"{FIXTURE}:TOOLS", "--call", "broken", "--args", '{"x": 1}']) == 1
    assert json.loads(capsys.readouterr().out)["error"]["type"] == "tool_error"
    assert cli_main(["tools", "--tools", f"{FIXTURE}:TOOLS", "--call", "echo", "--args", "[1]"]) == 2
    assert cli_main(["tools", "--tools", "no_such_module_here:X"]) == 2
    assert "cannot import 'no_such_module_here'" in capsys.readouterr().err
    assert cli_main(["tools", "--tools", f"{FIXTURE}:TOOLS", "--nova"]) == 0
    assert [t["toolSpec"]["name"] for t in json.loads(capsys.readouterr().out)][:2] == ["add_visit", "lookup_product"]


def test_cli_checks_the_shipped_example(capsys, monkeypatch, no_tool_env):
    monkeypatch.chdir(ROOT)  # the example's mcp.json is relative to the repository root
    assert cli_main(["tools", "--mcp-config", "examples/sales_calls/mcp.json"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"record_call\(doctor, product, when, notes\?\)\s+mcp:sales_calls\s+public", out), out
    assert re.search(r"list_calls\(doctor\?, limit\?\)\s+mcp:sales_calls\s+private", out), out
