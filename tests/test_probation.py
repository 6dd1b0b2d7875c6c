"""Probation: a server that failed an exchange but stayed up returns after a
backoff that doubles per failure in a row, capped, and is forgotten after
serving long enough."""

from __future__ import annotations

import pytest

from eaas_jax.control_plane.probation import Probation


def test_the_backoff_doubles_per_failure_in_a_row_up_to_the_cap():
    p = Probation(5.0, 60.0)
    assert not p.is_over(0, 0.0)  # never failed: nothing to end
    assert [p.failed(0, 0.0) for _ in range(6)] == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]
    assert not p.is_over(0, 59.9) and p.is_over(0, 60.0)
    assert not p.is_over(1, 100.0)  # servers are apart


def test_serving_long_enough_after_a_probation_clears_the_record():
    p = Probation(5.0, 60.0)
    p.failed(0, 0.0)  # out until 5
    p.served(0, 64.0)  # not yet 60 s past its end
    assert p.failed(0, 64.0) == 10.0  # out until 74
    p.served(0, 134.0)
    assert p.failed(0, 134.0) == 5.0


def test_forget_ends_a_probation_without_a_return():
    p = Probation(5.0, 60.0)
    p.failed(0, 0.0)
    p.forget(0)
    assert not p.is_over(0, 100.0) and p.failed(0, 100.0) == 5.0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        Probation(10.0, 5.0)
