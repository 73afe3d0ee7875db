"""API keys: each configured key is one tenant, identified by the sha256 of the key.

Keys are compared by hash with ``hmac.compare_digest`` against every configured key (no early
exit), so timing does not reveal how much of a key was right.
"""

from __future__ import annotations

import hashlib
import hmac

#: The owner of every job and dataset when the server runs without keys (loopback only).
LOCAL_OWNER = "local"


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyRing:
    """The configured keys, held only as hashes."""

    def __init__(self, keys: list[str]) -> None:
        self._hashes = [bytes.fromhex(key_hash(k)) for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._hashes)

    def owner_for(self, authorization: str | None) -> str | None:
        """The tenant of an ``Authorization`` header value; None when it carries no valid key."""
        if not self.enabled:
            return LOCAL_OWNER
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        presented = hashlib.sha256(token.strip().encode("utf-8")).digest()
        match = False
        for known in self._hashes:
            match |= hmac.compare_digest(presented, known)
        return presented.hex() if match else None


UNAUTHORIZED_MESSAGE = "A valid API key is required: send the header 'Authorization: Bearer <key>'."

__all__ = ["KeyRing", "LOCAL_OWNER", "UNAUTHORIZED_MESSAGE", "key_hash"]
