"""The report's PNG plots (`wsss/tuning/plots.py`)."""

from __future__ import annotations

from wsss.tuning.plots import integer_ticks


def test_trials_and_integer_parameters_get_whole_number_ticks():
    assert integer_ticks(0.96, 2.04) == [1, 2]
    assert integer_ticks(0.5, 40.5) == [1, 6, 11, 16, 21, 26, 31, 36]  # at most 8
    assert integer_ticks(2.9, 3.1) == [3]
