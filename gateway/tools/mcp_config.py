"""The MCP servers file (`NOVAGATE_MCP_CONFIG`), in the `mcpServers` format MCP clients share:

    {"mcpServers": {
        "files": {"command": "python", "args": ["server.py"], "env": {"KEY": "value"}, "cwd": "..."},
        "crm":   {"url": "https://crm.example.com/mcp", "headers": {"Authorization": "Bearer ${CRM_TOKEN}"}},
    }}

plus our `"public": true | ["tool", ...]` (which tools' arguments and results the client may see) and
the usual `"disabled": true`. `${VAR}` in command, args, env, cwd, url and headers is read from the
gateway's environment, so secrets stay out of the file. `"command": "python"` (or `python3`) is the
interpreter running the gateway, so a server written against the gateway's virtualenv just works."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from typing import Any

import orjson

from .spec import ToolSetupError

STARTUP_TIMEOUT_S = 15.0  # start, handshake and tools/list of one server
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_KNOWN = frozenset({"command", "args", "env", "cwd", "url", "headers", "public", "disabled", "type",
                    "transport", "description"})


@dataclass(frozen=True, slots=True)
class ServerConfig:
    name: str
    command: str = ""  # stdio
    args: tuple[str, ...] = ()
    env: dict[str, str] | None = None
    cwd: str | None = None
    url: str = ""  # streamable HTTP
    headers: dict[str, str] | None = None
    public: bool | frozenset[str] = False
    shown: str = ""  # the command line or URL as written, before ${VAR} expansion: error messages

    @property
    def transport(self) -> str:
        return "stdio" if self.command else "http"

    def is_public(self, tool: str) -> bool:
        return self.public if isinstance(self.public, bool) else tool in self.public

    def describe(self) -> str:
        """For error messages: what was started or reached, as written in the file (no expanded
        ${VAR}s, no headers: they may hold secrets)."""
        return self.shown or self.url or " ".join([self.command, *self.args])


def load_config(path: str) -> list[ServerConfig]:
    try:
        with open(path, "rb") as f:
            data = orjson.loads(f.read())
    except OSError as e:
        raise ToolSetupError(f"MCP config {path!r}: cannot read it: {e.strerror or e}") from e
    except orjson.JSONDecodeError as e:
        raise ToolSetupError(f"MCP config {path!r} is not valid JSON: {e}") from e
    servers = data.get("mcpServers") if isinstance(data, dict) else None
    if not isinstance(servers, dict):
        raise ToolSetupError(f'MCP config {path!r} needs an object "mcpServers": {{"name": {{...}}, ...}}')
    configs = []
    for name, entry in servers.items():
        where = f"MCP config {path!r}, server {name!r}"
        if not isinstance(entry, dict):
            raise ToolSetupError(f"{where}: must be an object")
        if entry.get("disabled") is True:
            continue
        configs.append(_server(name, entry, where))
    return configs


def _server(name: str, entry: dict[str, Any], where: str) -> ServerConfig:
    unknown = set(entry) - _KNOWN
    if unknown:
        raise ToolSetupError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    kind = entry.get("type", entry.get("transport"))
    if kind in ("sse",):
        raise ToolSetupError(f"{where}: the legacy SSE transport is not supported; use streamable HTTP (url)")
    command, url = entry.get("command"), entry.get("url")
    if bool(command) == bool(url):
        raise ToolSetupError(f'{where}: give either "command" (stdio) or "url" (streamable HTTP)')
    public = entry.get("public", False)
    if isinstance(public, list) and all(isinstance(t, str) for t in public):
        public = frozenset(public)
    elif not isinstance(public, bool):
        raise ToolSetupError(f'{where}: "public" must be true, false or a list of tool names')
    if command:
        if not isinstance(command, str):
            raise ToolSetupError(f'{where}: "command" must be a string')
        args = entry.get("args", [])
        env = entry.get("env")
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise ToolSetupError(f'{where}: "args" must be a list of strings')
        shown = " ".join([command, *args])
        command = _expand(command, where)
        if command in ("python", "python3"):
            command = sys.executable
        cwd = entry.get("cwd")
        return ServerConfig(
            name=name, command=command, args=tuple(_expand(a, where) for a in args),
            env=_string_map(env, "env", where), cwd=_expand(cwd, where) if isinstance(cwd, str) else None,
            public=public, shown=shown,
        )
    if not isinstance(url, str) or not _expand(url, where).startswith(("http://", "https://")):
        raise ToolSetupError(f'{where}: "url" must be an http:// or https:// URL')
    return ServerConfig(name=name, url=_expand(url, where), headers=_string_map(entry.get("headers"), "headers", where),
                        public=public, shown=url)


def _string_map(value: Any, key: str, where: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ToolSetupError(f'{where}: "{key}" must be an object of strings')
    return {k: _expand(v, where) for k, v in value.items()}


def _expand(text: str, where: str) -> str:
    def var(m: re.Match) -> str:
        value = os.environ.get(m.group(1))
        if value is None:
            raise ToolSetupError(f"{where}: ${{{m.group(1)}}} is not set in the environment")
        return value

    return _VAR.sub(var, text)
