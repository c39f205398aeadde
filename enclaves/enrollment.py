"""Creating enrollments (DESIGN.md §6), shared by the admin shell's issue() and INVITE."""

from __future__ import annotations

import os
import struct

from twisted.internet.defer import Deferred, ensureDeferred

from enclaves.crypto import KeyPair
from enclaves.storage.interface import IStorage, UserExists
from enclaves.token import EnrollmentToken

__all__ = ["DEFAULT_TOKEN_LIFETIME", "create_enrollment", "new_user_id"]

DEFAULT_TOKEN_LIFETIME = 24 * 3600


def new_user_id() -> int:
    """A random u64 user id, never 0 (0 is the server)."""
    while True:
        (user_id,) = struct.unpack(">Q", os.urandom(8))
        if user_id:
            return user_id


def create_enrollment(
    storage: IStorage, now_ms: int, lifetime_s: int = DEFAULT_TOKEN_LIFETIME
) -> Deferred[tuple[EnrollmentToken, int]]:
    """Store a new enrolling user; fires with its token and expiry (unix ms)."""

    async def create() -> tuple[EnrollmentToken, int]:
        expires_ms = now_ms + lifetime_s * 1000
        for _ in range(8):
            user_id, keys = new_user_id(), KeyPair.generate()
            try:
                await storage.add_user(user_id, keys, expires_ms)
            except UserExists:
                continue
            return EnrollmentToken(user_id, keys), expires_ms
        raise UserExists("could not find a free user id")

    return ensureDeferred(create())
