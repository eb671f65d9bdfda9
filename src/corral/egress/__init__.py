"""Egress: the sandbox's only way out is a proxy that checks every connection.

Protocol parsing (``http1``, ``socks5``, ``tls``, ``dnsmsg``) is sans-IO: bytes in,
decisions and bytes out, no sockets, so it is table-tested and fuzzed without a network.
``decide`` applies a policy's network rules to a destination; ``server`` is the proxy
process; ``host`` starts it and wires sandboxes to it.
"""
