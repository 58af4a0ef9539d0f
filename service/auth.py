"""API tokens: long random strings; the store keeps only their SHA-256.

A token is ``fgd_`` + 43 URL-safe characters (256 bits), so a fast hash is the right one: there
is nothing to brute-force, unlike a password.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import TYPE_CHECKING

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from service.cache import TtlCache
from service.models import Token, utcnow

if TYPE_CHECKING:
    from service.db import Store

TOKEN_PREFIX = "fgd_"


def hash_token(plain: str) -> str:
    return hashlib.sha256(plain.encode()).hexdigest()


def create_token(
    session: Session, name: str, *, admin: bool = False, quota: int = 10
) -> tuple[str, Token]:
    """Store a new token; returns ``(plain, row)`` (the plain token is shown once, never kept)."""
    if quota < 1:
        raise ValueError(f"quota must be >= 1, got {quota}")
    if not name.strip():
        raise ValueError("a token needs a name")
    plain = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = Token(name=name.strip(), token_hash=hash_token(plain), admin=admin, quota=quota)
    session.add(row)
    session.commit()
    return plain, row


def verify_token(session: Session, plain: str) -> Token | None:
    """The live token whose hash matches ``plain``, or None."""
    if not plain.startswith(TOKEN_PREFIX) or len(plain) > 200:
        return None
    row = session.scalar(_BY_HASH, {"token_hash": hash_token(plain)})
    if row is None or row.revoked_at is not None:
        return None
    return row


_BY_HASH = select(Token).where(Token.token_hash == bindparam("token_hash"))  # every request


def revoke_token(session: Session, token_id: int) -> bool:
    """Mark a token revoked; False if there is no such live token."""
    row = session.get(Token, token_id)
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = utcnow()
    session.commit()
    return True


class TokenCache:
    """The tokens this process verified in the last ``ttl`` seconds, by hash.

    Every request but health names its token: without a cache, each one would start with a
    look-up of its own in the store (a connection, a round trip, a thread hop). A token
    revoked in the store is refused by every API process within ``ttl`` seconds; ``ttl`` 0
    looks every token up every time. Unknown or revoked tokens are never cached.
    """

    MAX_ENTRIES = 10_000  # past this many live tokens, the cache starts over

    def __init__(self, store: Store, ttl: float) -> None:
        self.store = store
        self._tokens: TtlCache[str, Token] = TtlCache(ttl, self.MAX_ENTRIES)

    def cached(self, plain: str) -> Token | None:
        """The token, if verified less than ``ttl`` seconds ago (no I/O: safe on the loop)."""
        return self._tokens.lookup(hash_token(plain))[1]

    def verify(self, plain: str) -> Token | None:
        """Look the token up in the store (blocking), and remember it while it is live."""
        with self.store.session() as session:
            row = verify_token(session, plain)
            session.commit()  # the row stays loaded, detached from the closed session
        if row is not None:
            self._tokens.put(row.token_hash, row)
        return row
