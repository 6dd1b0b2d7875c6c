"""AdaptiveDeadline: each step's exchange deadline from the recent healthy
steps of the nearest token count at or above its own, clamped to [min, max]."""

from __future__ import annotations

import pytest

from eaas_jax.attention_client.deadlines import AdaptiveDeadline


def test_a_step_larger_than_any_seen_enough_gets_the_maximum():
    d = AdaptiveDeadline(min_us=1_000, max_us=2_000_000, margin=4.0, min_samples=3)
    assert d.deadline_us(8) == 2_000_000
    d.observe(8, 0.010)
    d.observe(8, 0.012)
    assert d.deadline_us(8) == 2_000_000
    d.observe(8, 0.011)
    assert d.deadline_us(8) == 48_000  # 4 x the slowest, 12 ms
    assert d.deadline_us(4) == 48_000  # fewer tokens: bounded by the 8-token steps
    assert d.deadline_us(16) == 2_000_000  # more tokens than any seen: the maximum


def test_the_nearest_larger_token_count_bounds_a_step():
    d = AdaptiveDeadline(min_us=1_000, max_us=10_000_000, margin=2.0, min_samples=1)
    d.observe(8, 0.010)
    d.observe(1024, 0.500)
    assert d.deadline_us(8) == 20_000
    assert d.deadline_us(64) == 1_000_000  # by the 1024-token steps, not the 8-token ones


def test_the_deadline_is_clamped_and_forgets_old_steps():
    d = AdaptiveDeadline(min_us=20_000, max_us=100_000, margin=4.0, window=4, min_samples=1)
    d.observe(8, 0.001)
    assert d.deadline_us(8) == 20_000  # floor
    d.observe(8, 0.5)
    assert d.deadline_us(8) == 100_000  # ceiling
    for _ in range(4):  # the slow step leaves the window
        d.observe(8, 0.010)
    assert d.deadline_us(8) == 40_000


def test_after_forget_every_step_gets_the_maximum_until_seen_again():
    d = AdaptiveDeadline(min_us=1_000, max_us=2_000_000, margin=4.0, min_samples=2)
    for tokens in (8, 64, 64):
        d.observe(tokens, 0.010)
    assert d.deadline_us(8) == 40_000
    d.forget()
    assert d.deadline_us(8) == d.deadline_us(64) == 2_000_000
    d.observe(8, 0.020)
    assert d.deadline_us(8) == 2_000_000  # one sample of two: not known yet
    d.observe(8, 0.010)
    assert d.deadline_us(8) == 80_000  # the samples from before forget() do not count


@pytest.mark.parametrize("kwargs", [dict(min_us=0, max_us=10), dict(min_us=20, max_us=10),
                                    dict(min_us=1, max_us=10, margin=0.5),
                                    dict(min_us=1, max_us=10, window=2, min_samples=3)])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        AdaptiveDeadline(**kwargs)


def test_a_negative_step_time_is_refused():
    with pytest.raises(ValueError, match="cannot take"):
        AdaptiveDeadline(min_us=1, max_us=10).observe(8, -1.0)
