"""Admin bearer tokens: from the environment, a file, or generated once.

Tokens are compared in constant time against every configured token (rotation
means two may be valid at once). They are never logged or accepted in a query string.
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from service.config import Settings
from service.errors import ConfigError
from service.http.problems import unauthorized

TOKEN_FILE_NAME = "admin-token"
_CALLER = re.compile(r"^[A-Za-z0-9 ._@:/+-]{1,64}$")


@dataclass(frozen=True, slots=True)
class AdminTokens:
    tokens: tuple[bytes, ...]
    origin: str  # "environment", a file path, or "generated:<path>"

    def caller(self, request: web.Request) -> str:
        """Who is calling, or raise 401. Checks every token, never short-circuits."""
        header = request.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise unauthorized()
        # aiohttp hands over undecodable header bytes surrogate-escaped.
        given = presented.strip().encode("utf-8", "surrogateescape")
        matched = 0
        for index, token in enumerate(self.tokens, start=1):
            if hmac.compare_digest(given, token):
                matched = index
        if not matched:
            raise unauthorized()
        named = request.headers.get("X-Requested-By", "")
        label = f"token-{matched}"
        return f"{named} ({label})" if _CALLER.match(named) else label


def load_tokens(settings: Settings) -> tuple[AdminTokens, str | None]:
    """The configured tokens, and the new token if one had to be generated."""
    if settings.admin_tokens:
        return AdminTokens(_encode(settings.admin_tokens), "environment"), None
    if settings.admin_tokens_file is not None:
        path = settings.admin_tokens_file
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(
                "SYNCLOCK_ADMIN_TOKENS_FILE", str(path), f"cannot read: {exc.strerror}"
            ) from exc
        tokens = tuple(line.strip() for line in text.splitlines() if line.strip())
        if not tokens or any(len(t) < 16 for t in tokens):
            raise ConfigError(
                "SYNCLOCK_ADMIN_TOKENS_FILE",
                str(path),
                "needs one token of 16+ characters per line",
            )
        return AdminTokens(_encode(tokens), str(path)), None
    return _generated(settings.data_dir / TOKEN_FILE_NAME)


def _generated(path: Path) -> tuple[AdminTokens, str | None]:
    if path.exists():
        token = path.read_text().strip()
        if len(token) >= 16:
            return AdminTokens(_encode((token,)), f"generated:{path}"), None
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    os.chmod(path, 0o600)
    return AdminTokens(_encode((token,)), f"generated:{path}"), token


def _encode(tokens: tuple[str, ...]) -> tuple[bytes, ...]:
    return tuple(t.encode() for t in tokens)
