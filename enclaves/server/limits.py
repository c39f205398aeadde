"""Sans-IO limits: failed-handshake backoff per source, message rate per session."""

from __future__ import annotations

import ipaddress
from collections import OrderedDict

from attrs import define

__all__ = ["FailureLimiter", "TokenBucket", "is_ip_address", "source_key"]


def is_ip_address(host: str) -> bool:
    """Whether a peer's host is an IP address (a UNIX socket's peer has none)."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def source_key(host: str) -> str:
    """What failures are counted against: an IPv4 address, or an IPv6 /64
    (one subscriber usually owns a whole /64, so per-address limits are moot)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@define
class _Failures:
    count: int
    last: float
    blocked_until: float


class FailureLimiter:
    """Per-source backoff after failed handshakes.

    The first ``free`` failures cost nothing; each further one blocks the source
    for ``base * 2**k`` seconds (k = failures beyond ``free``), at most ``cap``.
    The count goes down by one every ``decay`` seconds without a failure (so
    the honest failures of many users behind one address, a network cut
    mid-login each, do not add up over an afternoon), and a source is
    forgotten ``forget`` seconds after its last failure.  Only the
    source is slowed down: a user is never locked out by someone else.
    Sources are keyed by :func:`source_key`; the table is kept in order of
    last failure, so pruning only ever looks at its front (O(1) amortised).
    """

    def __init__(
        self,
        free: int = 5,
        base: float = 1.0,
        cap: float = 300.0,
        forget: float = 900.0,
        max_sources: int = 100_000,
        decay: float = 60.0,
    ) -> None:
        self.free, self.base, self.cap, self.forget = free, base, cap, forget
        self.decay = decay
        self.max_sources = max_sources
        self._sources: OrderedDict[str, _Failures] = OrderedDict()

    def blocked_for(self, source: str, now: float) -> float:
        """Seconds ``source`` must still wait (0 when it may try)."""
        source = source_key(source)
        entry = self._sources.get(source)
        if entry is None:
            return 0.0
        if now - entry.last > self.forget:
            del self._sources[source]
            return 0.0
        return max(0.0, entry.blocked_until - now)

    def failed(self, source: str, now: float) -> None:
        source = source_key(source)
        entry = self._sources.get(source)
        if entry is None or now - entry.last > self.forget:
            self._sources.pop(source, None)
            self._prune(now)
            entry = self._sources[source] = _Failures(0, now, 0.0)
        else:
            self._sources.move_to_end(source)
            entry.count = max(0, entry.count - int((now - entry.last) // self.decay))
        entry.count += 1
        entry.last = now
        beyond = entry.count - self.free
        if beyond > 0:
            entry.blocked_until = now + min(self.cap, self.base * 2 ** min(beyond - 1, 30))

    def _prune(self, now: float) -> None:
        """Drop expired sources, then the oldest while full; only the front is looked at."""
        sources = self._sources
        while sources:
            oldest = next(iter(sources.values()))
            if now - oldest.last > self.forget or len(sources) >= self.max_sources:
                sources.popitem(last=False)
            else:
                break


class TokenBucket:
    """``rate`` events per second on average, bursts up to ``burst``."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self._tokens = burst
        self._last = now

    def take(self, now: float, count: float = 1.0) -> bool:
        """Spend ``count`` tokens if there are enough; False if the rate is exceeded."""
        tokens = self._tokens + (now - self._last) * self.rate
        if tokens > self.burst:  # not min(): a call per SEND on the hot path
            tokens = self.burst
        self._last = now
        if tokens < count:
            self._tokens = tokens
            return False
        self._tokens = tokens - count
        return True
