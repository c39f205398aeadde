"""FailureLimiter (per IPv4 address or IPv6 /64, bounded, oldest evicted); TokenBucket."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from enclaves.server.limits import FailureLimiter, TokenBucket, source_key


def test_source_key() -> None:
    assert source_key("192.0.2.7") == "192.0.2.7"
    assert source_key("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert source_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert source_key("fe80::1%eth0") == "fe80::/64"
    assert source_key("not-an-address") == "not-an-address"


def test_one_ipv6_64_shares_one_backoff() -> None:
    limiter = FailureLimiter(free=2)
    for i in range(3):
        limiter.failed(f"2001:db8:0:1::{i + 1:x}", 100.0)
    assert limiter.blocked_for("2001:db8:0:1:dead::beef", 100.0) > 0
    assert limiter.blocked_for("2001:db8:0:2::1", 100.0) == 0


def test_full_table_evicts_the_source_whose_last_failure_is_oldest() -> None:
    limiter = FailureLimiter(free=0, max_sources=2)
    limiter.failed("192.0.2.1", 10.0)
    limiter.failed("192.0.2.2", 11.0)
    limiter.failed("192.0.2.1", 12.0)  # .1 is now the most recent
    limiter.failed("192.0.2.3", 13.0)  # full: .2 goes, not .1
    assert limiter.blocked_for("192.0.2.1", 13.0) > 0
    assert limiter.blocked_for("192.0.2.2", 13.0) == 0
    assert limiter.blocked_for("192.0.2.3", 13.0) > 0


def test_expired_sources_are_pruned_from_the_front() -> None:
    limiter = FailureLimiter(forget=100.0)
    for i in range(50):
        limiter.failed(f"198.51.100.{i}", float(i))
    limiter.failed("203.0.113.1", 160.0)  # every one of them is over 100 s old
    assert len(limiter._sources) == 1


@given(st.lists(st.tuples(st.integers(0, 40), st.floats(0, 5000)), max_size=200))
def test_never_over_capacity(events: list[tuple[int, float]]) -> None:
    limiter = FailureLimiter(max_sources=8, forget=300.0)
    now = 0.0
    for host, step in events:
        now += step / 100
        limiter.failed(f"10.0.0.{host}", now)
        assert len(limiter._sources) <= 8


def test_token_bucket_spends_its_burst_then_refills_at_its_rate_up_to_the_burst() -> None:
    bucket = TokenBucket(rate=10.0, burst=3.0, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(0.05)  # half a token back
    assert bucket.take(0.1) and not bucket.take(0.1)  # one whole token
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]  # capped
    assert bucket.take(100.2, count=2.0) and not bucket.take(100.2)


@given(st.lists(st.tuples(st.floats(0, 2), st.sampled_from([1.0, 2.0])), max_size=60))
def test_token_bucket_never_allows_more_than_burst_plus_rate_times_time(
    steps: list[tuple[float, float]],
) -> None:
    bucket = TokenBucket(rate=5.0, burst=4.0, now=0.0)
    now = spent = 0.0
    for wait, count in steps:
        now += wait
        if bucket.take(now, count):
            spent += count
        assert spent <= 4.0 + 5.0 * now + 1e-9
