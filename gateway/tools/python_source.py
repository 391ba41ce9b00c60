"""Python functions as tools (`NOVAGATE_TOOLS=package.module:attribute,...`).

The arguments' JSON Schema comes from the type hints (a pydantic model built from the signature),
the description from the docstring's first paragraph and each parameter's from a Google-style
`Args:` section. The model's arguments are validated against the same model before the call, so a
tool sees the types it declared. Coroutine functions are awaited; plain functions run in a worker
thread, so a slow or blocking tool never stalls the event loop the sessions share."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import os
import re
import sys
import typing
from collections.abc import Callable
from typing import Any

import pydantic

from ..logs import log
from .results import INVALID_ARGUMENTS, TOOL_ERROR, ToolResult, failure, success
from .spec import SourceTool, ToolSetupError, strip_titles

logger = logging.getLogger("novagate.tools")

_PUBLIC_ATTR = "__novagate_public__"
_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Params)\s*:\s*$")
_OTHER_SECTION = re.compile(
    r"^\s*(Returns?|Yields?|Raises|Examples?|Notes?|Attributes|See Also|Warnings?|Todo)\s*:\s*$", re.IGNORECASE
)
_ARG_LINE = re.compile(r"^\s*\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


def public(fn: Callable) -> Callable:
    """Mark a Python tool public: its arguments and results may be shown to the client."""
    setattr(fn, _PUBLIC_ATTR, True)
    return fn


def load_python_tools(specs: str) -> list[SourceTool]:
    """Every tool named by `specs` (comma-separated `package.module:attribute`; the attribute is a
    function or a list/tuple of functions). Modules import from sys.path and the working directory."""
    if os.getcwd() not in sys.path:  # `novagate serve` from a checkout: its modules, as `python -m` would
        sys.path.append(os.getcwd())
    tools: list[SourceTool] = []
    seen: set[int] = set()
    for spec in (s.strip() for s in specs.split(",")):
        if not spec:
            continue
        module_name, _, attribute = spec.partition(":")
        module_name, attribute = module_name.strip(), attribute.strip()
        if not module_name or not attribute:
            raise ToolSetupError(f"NOVAGATE_TOOLS entry {spec!r} must be package.module:attribute")
        try:
            module = importlib.import_module(module_name)
        except Exception as e:
            raise ToolSetupError(f"NOVAGATE_TOOLS: cannot import {module_name!r}: {type(e).__name__}: {e}") from e
        obj: Any = module
        for part in attribute.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise ToolSetupError(f"NOVAGATE_TOOLS: {module_name!r} has no attribute {attribute!r}") from None
        functions = list(obj) if isinstance(obj, (list, tuple)) else [obj]
        for fn in functions:
            if not callable(fn):
                raise ToolSetupError(f"NOVAGATE_TOOLS: {spec} holds {fn!r}, which is not a function")
            if id(fn) not in seen:  # the same function named twice is one tool
                seen.add(id(fn))
                tools.append(python_tool(fn, module_name))
    return tools


def python_tool(fn: Callable, module_name: str) -> SourceTool:
    name = getattr(fn, "__name__", None) or type(fn).__name__
    where = f"python:{module_name}"
    description, arg_docs = parse_docstring(inspect.getdoc(fn) or "")
    try:
        signature = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=True)
    except (TypeError, ValueError, NameError) as e:
        raise ToolSetupError(f"{where}: cannot read the signature of {name}: {e}") from e
    fields: dict[str, Any] = {}
    params: list[tuple[str, str, inspect.Parameter]] = []  # (field, parameter, its kind)
    for i, p in enumerate(signature.parameters.values()):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ToolSetupError(f"{where}: tool {name} takes *{p.name}; a tool's parameters must be named")
        # the field has a neutral name and the parameter's as alias: `json`, `model_x` or `_x` are
        # fine parameter names but would clash with pydantic's own attributes
        field = f"p{i}"
        default = ... if p.default is p.empty else p.default
        fields[field] = (hints.get(p.name, Any), pydantic.Field(default, alias=p.name,
                                                                 description=arg_docs.get(p.name)))
        params.append((field, p.name, p))
    try:
        model = pydantic.create_model(
            f"{name}_arguments", __config__=pydantic.ConfigDict(extra="forbid"), **fields
        )
        schema = strip_titles(model.model_json_schema(by_alias=True))
    except (pydantic.PydanticUserError, pydantic.PydanticSchemaGenerationError, TypeError) as e:
        raise ToolSetupError(f"{where}: tool {name}: its parameters' types have no JSON Schema: {e}") from e
    schema.setdefault("properties", {})
    is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))

    async def invoke(arguments: dict) -> ToolResult:
        try:
            values = model.model_validate(arguments)
        except pydantic.ValidationError as e:
            return failure(INVALID_ARGUMENTS, describe_validation(e))
        positional = [getattr(values, f) for f, _, p in params if p.kind is p.POSITIONAL_ONLY]
        keywords = {pname: getattr(values, f) for f, pname, p in params if p.kind is not p.POSITIONAL_ONLY}
        try:
            if is_async:
                value = await fn(*positional, **keywords)
            else:
                value = await asyncio.to_thread(fn, *positional, **keywords)
                if inspect.isawaitable(value):
                    value = await value
        except Exception as e:
            log(logger, logging.WARNING, "python tool raised", tool=name, source=where, error=type(e).__name__)
            log(logger, logging.DEBUG, "python tool traceback", tool=name, exc_info=True)
            return failure(TOOL_ERROR, f"{type(e).__name__}: {e}")
        return success(value)

    return SourceTool(
        name=name, description=description or name.replace("_", " "), input_schema=schema,
        public=bool(getattr(fn, _PUBLIC_ATTR, False)), source=where, prefix=module_name.rsplit(".", 1)[-1],
        invoke=invoke,
    )


def describe_validation(e: pydantic.ValidationError) -> str:
    """Which argument is wrong and why, without echoing the values."""
    parts = []
    for err in e.errors(include_url=False, include_input=False):
        where = ".".join(str(x) for x in err["loc"]) or "arguments"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(first paragraph on one line, {parameter: description}) of a Google-style docstring."""
    lines = doc.splitlines()
    summary: list[str] = []
    for line in lines:
        if not line.strip() or _SECTION.match(line) or _OTHER_SECTION.match(line):
            break
        summary.append(line.strip())
    args: dict[str, str] = {}
    section_indent: int | None = None
    entry_indent: int | None = None
    current: str | None = None
    for line in lines:
        indent = len(line) - len(line.lstrip())
        if section_indent is None:
            if _SECTION.match(line):
                section_indent = indent
            continue
        if not line.strip():
            continue
        if indent <= section_indent:  # the next section (or the end of this one)
            if _SECTION.match(line):
                continue
            break
        if entry_indent is None:
            entry_indent = indent
        m = _ARG_LINE.match(line)
        if indent == entry_indent and m:
            current = m.group(1)
            args[current] = m.group(2).strip()
        elif current is not None:
            args[current] = f"{args[current]} {line.strip()}".strip()
    return " ".join(summary), args
