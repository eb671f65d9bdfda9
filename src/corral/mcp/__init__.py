"""Tool calls over MCP, under a policy.

guard      one tool call through gate, auditor and ledger (Sandbox.run's path, for tools)
server     ``corral mcp``: a sandboxed shell and the workspace's files as MCP tools
gateway    ``corral mcp-gateway``: an MCP server in front of another, letting through
           only what the policy allows
redact     secret shapes taken out of results (rules/secrets.yaml)
transport  stdio and streamable HTTP, shut down cleanly
"""
