"""examples/own_loop.py (docs/own-loop.md): a plain torch loop with stock DDP and disttrain's parts equals one device
(float64, W=3, B=31: slices of 11, 10, 10), and the same loop with DDP's plain average is caught by
assert_equivalent. Four small process groups, forked from disttrain.testing's forkserver.
"""

from __future__ import annotations

import pytest

from disttrain.testing import assert_equivalent
from examples.own_loop import train


def test_the_own_loop_example_equals_one_device_at_w3_b31():
    report = assert_equivalent(train, 3, steps=4, global_batch_size=31)
    assert report.equivalent and report.tolerance == 1e-10
    assert report.max_param_rel_diff <= 1e-10 and report.max_loss_rel_diff <= 1e-10
    assert len(report.steps) == 4


def test_the_same_loop_with_ddps_plain_average_fails_with_the_table():
    with pytest.raises(AssertionError) as info:
        assert_equivalent(train, 3, steps=4, global_batch_size=31, exact=False)
    message = str(info.value)
    assert message.startswith("train at 3 ranks does not match 1:")
    for part in ("loss (W=3)", "max relative parameter difference", "floor (float64):", "NOT EQUIVALENT",
                 "assert_equivalent runs no rounding twin"):
        assert part in message
    assert "--uncalibrated" not in message  # a CLI flag means nothing to a test's author
