"""Bearer-JWT protection for the admin API.

Tokens are HS256 with `JWT_SECRET_KEY` (seed 002's name) or RS256 with a configured public key.
Scopes travel in the standard space-separated `scope` claim; `admin` grants everything. `exp` is
required. Mint a token for development with:

    .venv/bin/python -m tiffin.auth mint --scope admin --ttl 3600
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import jwt
from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_SECRETS = {"", "your-secret-key", "secret", "changeme", "change-me", "dev", "test"}
SCOPES = ("admin", "models:write", "traffic:write")
DEV_SECRET_FILE = Path(".tiffin/dev-jwt-secret")


class AuthSettings(BaseSettings):
    """Admin API authentication."""

    model_config = SettingsConfigDict(env_prefix="TIFFIN_AUTH_", extra="ignore")

    jwt_secret_key: str | None = Field(
        None, validation_alias=AliasChoices("TIFFIN_AUTH_JWT_SECRET_KEY", "JWT_SECRET_KEY")
    )
    """HS256 signing secret (seed 002's `JWT_SECRET_KEY`); at least 32 characters in production."""

    public_key: str | None = None
    """PEM public key (or a path to one) for RS256 tokens; when set, RS256 is accepted."""

    issuer: str | None = None
    """When set, tokens must carry this `iss`."""

    audience: str | None = None
    """When set, tokens must carry this `aud`."""

    leeway_s: float = Field(5.0, ge=0)
    """Clock skew tolerated on `exp`/`nbf`."""

    @field_validator("public_key")
    @classmethod
    def _pem_or_file(cls, value: str | None) -> str | None:
        if not value or value.lstrip().startswith("-----BEGIN") or Path(value).is_file():
            return value
        raise ValueError("neither a PEM public key nor the path of a readable file")

    def rs256_key(self) -> str | None:
        if not self.public_key:
            return None
        if self.public_key.lstrip().startswith("-----BEGIN"):
            # The key itself. Never stat() it as a path: its base64 holds '/', and a run of
            # more than 255 characters between two of them is ENAMETOOLONG (a 500 on every
            # admin call with a token, for one key in a few).
            return self.public_key
        return Path(self.public_key).read_text()


class AuthError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def check_startup(settings: AuthSettings, environment: str) -> None:
    """Refuse to run production with no key or a placeholder secret."""
    if environment != "production" or settings.rs256_key():
        return
    secret = settings.jwt_secret_key or ""
    if secret.strip().lower() in PLACEHOLDER_SECRETS or len(secret) < 32:
        raise RuntimeError(
            "production mode needs JWT_SECRET_KEY (>= 32 random characters, not a placeholder) "
            "or TIFFIN_AUTH_PUBLIC_KEY for RS256"
        )


def dev_secret() -> str:
    """The development secret `make serve` generates once and keeps in .tiffin/."""
    if DEV_SECRET_FILE.exists():
        return DEV_SECRET_FILE.read_text().strip()
    DEV_SECRET_FILE.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    DEV_SECRET_FILE.write_text(secret)
    DEV_SECRET_FILE.chmod(0o600)
    return secret


@lru_cache
def auth_settings() -> AuthSettings:
    return AuthSettings()


def authorize(header: str | None, required_scope: str, settings: AuthSettings) -> dict[str, Any]:
    """Claims of a valid token carrying `required_scope` (or `admin`); AuthError otherwise."""
    if not header or not header.lower().startswith("bearer "):
        raise AuthError(401, "missing bearer token: send 'Authorization: Bearer <jwt>'")
    token = header.split(" ", 1)[1].strip()
    keys: list[tuple[str, str]] = []
    if settings.jwt_secret_key:
        keys.append(("HS256", settings.jwt_secret_key))
    if rs256 := settings.rs256_key():
        keys.append(("RS256", rs256))
    if not keys:
        raise AuthError(401, "admin API has no key configured (JWT_SECRET_KEY)")
    try:
        algorithm = jwt.get_unverified_header(token).get("alg")
    except jwt.PyJWTError as exc:
        raise AuthError(401, f"invalid token: {exc}") from None
    key = next((k for alg, k in keys if alg == algorithm), None)
    if key is None:
        raise AuthError(401, f"invalid token: algorithm {algorithm!r} is not accepted")
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[str(algorithm)],
            leeway=settings.leeway_s,
            issuer=settings.issuer,
            audience=settings.audience,
            options={"require": ["exp"], "verify_aud": settings.audience is not None},
        )
    except jwt.ExpiredSignatureError:
        raise AuthError(401, "token expired") from None
    except jwt.PyJWTError as exc:
        raise AuthError(401, f"invalid token: {exc}") from None
    granted = set(str(claims.get("scope", "")).split())
    if "admin" not in granted and required_scope not in granted:
        raise AuthError(403, f"token lacks scope {required_scope!r} (or 'admin')")
    return claims


def mint(secret: str, scope: str, ttl_s: int, subject: str = "tiffin-admin") -> str:
    now = int(time.time())
    claims = {"sub": subject, "scope": scope, "iat": now, "exp": now + ttl_s}
    return jwt.encode(claims, secret, algorithm="HS256")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Mint an HS256 admin token")
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("mint")
    m.add_argument("--scope", default="admin", help=f"space-separated, from {', '.join(SCOPES)}")
    m.add_argument("--ttl", type=int, default=3600, help="seconds until the token expires")
    m.add_argument("--subject", default="tiffin-admin")
    args = parser.parse_args(argv)
    secret = AuthSettings().jwt_secret_key or (dev_secret() if DEV_SECRET_FILE.exists() else None)
    if not secret:
        print("set JWT_SECRET_KEY (or run `make serve` once for a dev secret)", file=sys.stderr)
        return 2
    print(mint(secret, args.scope, args.ttl, args.subject))
    return 0


if __name__ == "__main__":
    sys.exit(main())
