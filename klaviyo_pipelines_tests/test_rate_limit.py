"""Unit tests of RateLimiter with a fake clock (no sleeping), plus one real-thread test."""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from itertools import pairwise

import pytest

from klaviyo_pipelines.klaviyo.endpoints import PROFILES, EndpointClass
from klaviyo_pipelines.klaviyo.rate_limit import RateLimiter

TINY = EndpointClass("tiny", burst_per_second=5, steady_per_minute=1000)
SLOW = EndpointClass("slow", burst_per_second=100, steady_per_minute=10)


class FakeClock:
    """A clock that only moves when someone sleeps on it."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


def exact_limiter(clock: FakeClock, time_scale: float = 1.0) -> RateLimiter:
    """No safety margin, so expected waits are round numbers."""
    return RateLimiter(
        time_scale=time_scale, window_margin=0.0, jitter=0.0, clock=clock, sleep=clock.sleep
    )


def max_in_window(times: list[float], window: float) -> int:
    """Largest number of timestamps in any half-open window [t, t + window)."""
    return max(bisect_left(times, t + window) - i for i, t in enumerate(times))


def test_burst_allows_limit_then_waits_for_window() -> None:
    clock = FakeClock()
    limiter = exact_limiter(clock)
    assert [limiter.acquire(TINY) for _ in range(5)] == [0.0] * 5
    waited = limiter.acquire(TINY)
    assert waited == pytest.approx(1.0)
    assert clock.t == pytest.approx(1001.0)


def test_steady_limit_holds_until_the_minute_passes() -> None:
    clock = FakeClock()
    limiter = exact_limiter(clock)
    for _ in range(10):
        limiter.acquire(SLOW)
    start = clock.t
    limiter.acquire(SLOW)
    assert clock.t - start == pytest.approx(60.0)


def test_classes_have_separate_buckets() -> None:
    clock = FakeClock()
    limiter = exact_limiter(clock)
    for _ in range(10):
        limiter.acquire(SLOW)
    assert limiter.acquire(TINY) == 0.0


def test_time_scale_shrinks_windows() -> None:
    clock = FakeClock()
    limiter = exact_limiter(clock, time_scale=60.0)
    for _ in range(10):
        limiter.acquire(SLOW)
    assert limiter.acquire(SLOW) == pytest.approx(1.0)


def test_long_run_stays_just_under_both_limits() -> None:
    """2,000 profile requests: never over 75 per 1 s or 750 per 60 s, yet close to 750/min."""
    clock = FakeClock()
    limiter = RateLimiter(clock=clock, sleep=clock.sleep)  # default safety margins
    start = clock.t
    sends = []
    for _ in range(2000):
        limiter.acquire(PROFILES)
        sends.append(clock.t)
    assert max_in_window(sends, 1.0) <= PROFILES.burst_per_second
    assert max_in_window(sends, 60.0) <= PROFILES.steady_per_minute
    # Send number 1500 opens the third minute: 1500 requests took two (slightly long) minutes.
    per_minute = 1500 / ((sends[1500] - start) / 60)
    assert 0.95 * PROFILES.steady_per_minute <= per_minute <= PROFILES.steady_per_minute


def test_remaining_below_our_estimate_paces_out_the_rest() -> None:
    """Another integration used most of the minute: spread what is left over Reset."""
    clock = FakeClock()
    limiter = exact_limiter(clock)
    for _ in range(10):
        limiter.acquire(PROFILES)
    # Server counted 650 in its window, only 10 of them ours: 100 left for 30 more seconds.
    limiter.observe(
        PROFILES,
        {"RateLimit-Limit": "750", "RateLimit-Remaining": "100", "RateLimit-Reset": "30"},
    )
    start = clock.t
    sends = []
    for _ in range(100):
        limiter.acquire(PROFILES)
        sends.append(clock.t - start)
    gaps = [b - a for a, b in pairwise(sends)]
    assert min(gaps) == pytest.approx(0.3)
    assert sends[-1] <= 30.0
    # Budget spent: the next request waits for the server's window to reset.
    limiter.acquire(PROFILES)
    assert clock.t - start == pytest.approx(30.0)


def test_remaining_zero_blocks_until_reset() -> None:
    clock = FakeClock()
    limiter = exact_limiter(clock)
    limiter.acquire(PROFILES)
    limiter.observe(
        PROFILES,
        {"RateLimit-Limit": "750", "RateLimit-Remaining": "0", "RateLimit-Reset": "12"},
    )
    assert limiter.acquire(PROFILES) == pytest.approx(12.0)


def test_headers_matching_our_own_usage_do_not_slow_down() -> None:
    clock = FakeClock()
    limiter = exact_limiter(clock)
    for _ in range(10):
        limiter.acquire(PROFILES)
    limiter.observe(
        PROFILES,
        {"ratelimit-limit": "750", "ratelimit-remaining": "740", "ratelimit-reset": "59"},
    )
    assert limiter.acquire(PROFILES) == 0.0


def test_requests_in_flight_are_not_counted_as_someone_elses() -> None:
    """A response describes the server before our later requests landed (sent_at)."""
    clock = FakeClock()
    limiter = exact_limiter(clock)
    limiter.acquire(PROFILES)
    sent_at = limiter.now()
    for _ in range(20):  # sent after the first one, not yet counted by the server
        limiter.acquire(PROFILES)
    limiter.observe(
        PROFILES,
        {"RateLimit-Limit": "750", "RateLimit-Remaining": "749", "RateLimit-Reset": "60"},
        sent_at=sent_at,
    )
    assert limiter.acquire(PROFILES) == 0.0


def test_lower_server_limit_is_believed() -> None:
    clock = FakeClock()
    limiter = exact_limiter(clock)
    limiter.observe(PROFILES, {"RateLimit-Limit": "700, 700;w=60"})
    for _ in range(700):
        limiter.acquire(PROFILES)
    start = clock.t
    limiter.acquire(PROFILES)
    assert clock.t - start > 40  # the 701st waits for the oldest to leave the minute


def test_missing_or_garbage_headers_are_ignored() -> None:
    clock = FakeClock()
    limiter = exact_limiter(clock)
    limiter.observe(PROFILES, {})
    limiter.observe(PROFILES, {"RateLimit-Remaining": "soon", "RateLimit-Reset": ""})
    assert limiter.acquire(PROFILES) == 0.0


def test_penalize_blocks_the_class_for_retry_after() -> None:
    clock = FakeClock()
    limiter = exact_limiter(clock)
    limiter.penalize(PROFILES, 7)
    assert limiter.acquire(PROFILES) == pytest.approx(7.0)
    assert limiter.acquire(TINY) == 0.0  # other classes unaffected
    limiter.penalize(PROFILES, 0)
    assert limiter.acquire(PROFILES) == 0.0


def test_penalize_is_real_seconds_and_never_shortened() -> None:
    """Retry-After is taken as sent, even when windows are scaled (the sandbox sends real s)."""
    clock = FakeClock()
    limiter = exact_limiter(clock, time_scale=10.0)
    limiter.penalize(PROFILES, 2)
    limiter.penalize(PROFILES, 1)
    assert limiter.acquire(PROFILES) == pytest.approx(2.0)


def test_reset_header_is_real_seconds_when_scaled() -> None:
    clock = FakeClock()
    limiter = exact_limiter(clock, time_scale=60.0)
    limiter.acquire(PROFILES)
    limiter.observe(
        PROFILES,
        {"RateLimit-Limit": "750", "RateLimit-Remaining": "0", "RateLimit-Reset": "0.400"},
    )
    assert limiter.acquire(PROFILES) == pytest.approx(0.4)


def test_threads_share_the_buckets() -> None:
    """Real clock and threads: 60 sends of a 10-per-0.1 s class never exceed the burst."""
    limiter = RateLimiter(time_scale=10.0)
    cls = EndpointClass("threads", burst_per_second=10, steady_per_minute=100_000)
    sends: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(10):
            limiter.acquire(cls)
            with lock:
                sends.append(time.monotonic())

    threads = [threading.Thread(target=worker) for _ in range(6)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sends.sort()
    assert len(sends) == 60
    assert max_in_window(sends, 0.1) <= 10
    assert time.monotonic() - started >= 0.5  # 60 sends at 10 per 0.1 s


def test_time_scale_must_be_positive() -> None:
    with pytest.raises(ValueError):
        RateLimiter(time_scale=0)


def test_burst_window_counts_a_request_from_when_it_was_answered() -> None:
    """A slow answer may mean a late arrival at Klaviyo: the burst window starts then."""
    clock = FakeClock()
    limiter = exact_limiter(clock)
    one_per_second = EndpointClass("one", burst_per_second=1, steady_per_minute=1000)
    limiter.acquire(one_per_second)
    sent_at = limiter.now()
    clock.t += 0.4  # the answer takes 400 ms
    limiter.observe(one_per_second, {}, sent_at=sent_at)
    start = clock.t
    limiter.acquire(one_per_second)
    assert clock.t - start == pytest.approx(1.0)  # one full window after the answer
