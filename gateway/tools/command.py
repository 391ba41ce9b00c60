"""`novagate tools`: load the configured tool sources as `serve` would and say what the model gets;
`--call NAME --args JSON` runs one tool (checking a server without a voice session)."""

from __future__ import annotations

import argparse
import asyncio
import sys

import orjson


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mcp-config", help="MCP servers file (default: NOVAGATE_MCP_CONFIG)")
    p.add_argument("--tools", help="Python tools, package.module:attribute,... (default: NOVAGATE_TOOLS)")
    p.add_argument("--call", metavar="NAME", help="run this tool once and print its result (JSON)")
    p.add_argument("--args", default="{}", metavar="JSON", help="the tool's arguments, a JSON object (default {})")
    p.add_argument("--timeout", type=float, help="seconds the call may take (default: NOVAGATE_TOOL_TIMEOUT_S)")
    p.add_argument("--nova", action="store_true", help="print the tool configuration Nova Sonic is given (JSON)")


def main(args: argparse.Namespace) -> int:
    from .. import logs
    from ..config import ConfigError, Settings

    try:
        settings = Settings.from_env(mcp_config=args.mcp_config, tools=args.tools, tool_timeout_s=args.timeout)
    except ConfigError as e:
        print(f"novagate tools: configuration error: {e}", file=sys.stderr)
        return 2
    # warnings only, unless asked: the summary on stdout is the point
    logs.setup("debug" if settings.log_level == "debug" else "warning", show_text=settings.log_transcripts)
    arguments = None
    if args.call:
        try:
            arguments = orjson.loads(args.args)
        except orjson.JSONDecodeError as e:
            print(f"novagate tools: --args is not valid JSON: {e}", file=sys.stderr)
            return 2
        if not isinstance(arguments, dict):
            print("novagate tools: --args must be a JSON object", file=sys.stderr)
            return 2
    return asyncio.run(_run(settings, args, arguments))


async def _run(settings, args: argparse.Namespace, arguments: dict | None) -> int:
    from . import ToolSetupError, open_toolbox

    if not settings.mcp_config and not settings.tools:
        print("novagate tools: no tools configured: set NOVAGATE_MCP_CONFIG and/or NOVAGATE_TOOLS "
              "(docs/tools.md)", file=sys.stderr)
        return 2 if args.call else 0
    try:
        box = await open_toolbox(mcp_config=settings.mcp_config or None, python_tools=settings.tools or None)
    except ToolSetupError as e:
        print(f"novagate tools: {e}", file=sys.stderr)
        return 2
    try:
        if args.nova:
            print(orjson.dumps(box.nova_tools(), option=orjson.OPT_INDENT_2).decode())
        elif not args.call:
            print(f"{len(box)} tool{'s' if len(box) != 1 else ''}:")
            for line in box.summary():
                print(f"  {line}")
        if args.call:
            try:
                result = await asyncio.wait_for(box.call(args.call, arguments), settings.tool_timeout_s)
            except TimeoutError:
                print(orjson.dumps({"error": {"type": "timeout", "message": f"no result within "
                                              f"{settings.tool_timeout_s:g} s"}}).decode())
                return 1
            print(result.content)
            return 0 if result.ok else 1
        return 0
    finally:
        await box.aclose()
