"""A small MCP server for the gateway's tests, built with the mcp SDK (``MCPServer``).

It stands for the third-party servers an agent uses: a few harmless tools, one that
leaks secrets in its result, and dangerous ones a policy should keep the agent from.
Every call it receives is appended to the file named by its first argument (one JSON
object per line), so a test can prove that a denied call never reached it.

    python tests/mcptools/upstream_server.py CALLS_FILE
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from mcp.server.mcpserver import MCPServer

CALLS = Path(sys.argv[1])
# A well-known shape (the AWS documentation's example key), never a real one.
LEAKED = (
    "config loaded:\n"
    "aws_access_key_id = AKIAIOSFODNN7EXAMPLE\n"
    "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n"
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7bq\n-----END RSA PRIVATE KEY-----\n"
)

server = MCPServer("records")


def received(tool: str, args: dict[str, Any]) -> None:
    with CALLS.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"tool": tool, "args": args}) + "\n")


@server.tool()
def echo(text: str) -> str:
    """Say the text back."""
    received("echo", {"text": text})
    return text


@server.tool()
def read_file(path: str) -> str:
    """Read a file (the test upstream only pretends to)."""
    received("read_file", {"path": path})
    return f"contents of {path}"


@server.tool()
def show_config() -> str:
    """Print the service's configuration, secrets included (the leak to redact)."""
    received("show_config", {})
    return LEAKED


@server.tool()
def drop_database(name: str) -> str:
    """Destroy a database."""
    received("drop_database", {"name": name})
    return f"dropped {name}"


if __name__ == "__main__":
    server.run("stdio")
