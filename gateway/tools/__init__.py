"""Tools the model may call (issue 11): MCP servers (`NOVAGATE_MCP_CONFIG`) and Python functions
(`NOVAGATE_TOOLS`), loaded at start-up into one ToolBox (docs/tools.md)."""

from .python_source import public
from .results import ToolResult
from .spec import ToolSetupError, ToolSpec
from .toolbox import EMPTY, ToolBox, open_toolbox

__all__ = ["EMPTY", "ToolBox", "ToolResult", "ToolSetupError", "ToolSpec", "open_toolbox", "public"]
