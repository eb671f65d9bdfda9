"""Who is calling: API tokens, read the ways ROCK clients send them.

ROCK's SDK sends whatever its caller put in ``extra_headers``, conventionally
``XRL-Authorization: Bearer TOKEN``; other clients use ``Authorization: Bearer TOKEN`` or
``X-API-Key: TOKEN``. A token maps to a user; a sandbox belongs to the user whose token
started it. ``X-User-Id`` and friends are what the client says about itself: labels on
the ledger, never identity.

One role beside the plain user: an ``operator`` (the people on call for a cluster) sees
and acts on every sandbox in the live view, whoever started it. It is given only in the
tokens file, by name (``oncall: {token: ..., role: operator}``), never by a header.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from corral.errors import CorralError

TOKEN_ENV = "CORRAL_SERVE_TOKEN"
LOCAL_USER = "local"
ROLES = ("user", "operator")
LABEL_HEADERS = {
    "x-user-id": "user_id",
    "x-experiment-id": "experiment_id",
    "x-namespace": "namespace",
}


class TokenError(CorralError, ValueError):
    """A token file cannot be used; the message names the file and entry."""


@dataclass(frozen=True, slots=True)
class Tokens:
    by_token: Mapping[str, str]  # token -> user
    operators: frozenset[str] = frozenset()  # users who see every user's sandboxes

    def is_operator(self, user: str) -> bool:
        return user in self.operators

    def user(self, token: str | None) -> str | None:
        if not token:
            return None
        found = None
        for known, user in self.by_token.items():
            # Every entry compared, in constant time each: no early exit to time.
            if hmac.compare_digest(known.encode(), token.encode()):
                found = user
        return found

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None, env: Mapping[str, str]) -> Tokens:
        """From a YAML file mapping each user to a token, a list of tokens, or
        ``{token: T | tokens: [...], role: user | operator}``, and ``$CORRAL_SERVE_TOKEN``
        for a user named ``default``."""
        table: dict[str, str] = {}
        operators: set[str] = set()
        if path is not None:
            p = Path(path)
            try:
                data = yaml.safe_load(p.read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError) as e:
                raise TokenError(f"{p}: cannot read tokens: {e}") from None
            if not isinstance(data, dict):
                raise TokenError(f"{p}: expected a mapping of user: token")
            for user, entry in data.items():
                tokens, role = _entry(p, str(user), entry)
                if role == "operator":
                    operators.add(str(user))
                for t in tokens:
                    if not isinstance(t, str) or len(t) < 16:
                        raise TokenError(
                            f"{p}: {user}: a token must be a string of at least 16 characters"
                        )
                    if t in table:
                        raise TokenError(f"{p}: {user}: this token is also {table[t]}'s")
                    table[t] = str(user)
        if env.get(TOKEN_ENV):
            t = env[TOKEN_ENV]
            if len(t) < 16:
                raise TokenError(f"${TOKEN_ENV} must be at least 16 characters")
            table.setdefault(t, "default")
        return cls(table, frozenset(operators))


def _entry(p: Path, user: str, entry: object) -> tuple[list[object], str]:
    """One user's tokens and role, from the forms a tokens file may give them in."""
    if not isinstance(entry, dict):
        return (entry if isinstance(entry, list) else [entry]), "user"
    unknown = set(entry) - {"token", "tokens", "role"}
    if unknown:
        raise TokenError(
            f"{p}: {user}: unknown key {sorted(unknown)[0]!r} (known: token, tokens, role)"
        )
    if ("token" in entry) == ("tokens" in entry):
        raise TokenError(f"{p}: {user}: give either token or tokens")
    role = entry.get("role", "user")
    if role not in ROLES:
        raise TokenError(f"{p}: {user}: role must be one of {', '.join(ROLES)}, not {role!r}")
    tokens = entry.get("tokens", [entry.get("token")])
    return (tokens if isinstance(tokens, list) else [tokens]), str(role)


def token_from(headers: Mapping[str, str]) -> str | None:
    """The token in the request's headers (lower-case names), however it was sent."""
    for name in ("xrl-authorization", "authorization"):
        value = headers.get(name, "").strip()
        if value:
            scheme, _, rest = value.partition(" ")
            # ROCK's own docs misspell the scheme ("Baerer"); take any scheme word.
            return rest.strip() if rest else scheme
    return headers.get("x-api-key", "").strip() or None


def labels_from(headers: Mapping[str, str]) -> dict[str, str]:
    return {label: headers[h] for h, label in LABEL_HEADERS.items() if headers.get(h)}
