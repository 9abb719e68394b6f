"""TemporalSchedule against the worked table of tp-schedule.md section 2 and the formulas of schedules.md.

The float references below are re-typed from the specs (not imported from the package).
"""

import json
import math
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rlvr_kernels
from rlvr_kernels import TemporalSchedule

# tp-schedule.md section 2: linear, m0 = 0.99, T = 100 (k_max = 80); values as printed there.
WORKED_TABLE = {
    "linear": {1: "0.9776", 20: "0.7425", 40: "0.495", 60: "0.2475", 80: "0"},
    "sigmoid": {1: "0.98810", 20: "0.88606", 40: "0.495", 60: "0.10394", 80: "0"},
    "gamma": {1: "0.95575", 20: "0.55131", 40: "0.24503", 60: "0.06126", 80: "0"},
}


@pytest.mark.parametrize("mode", sorted(WORKED_TABLE))
def test_worked_table_to_the_printed_digits(mode):
    sched = TemporalSchedule(mode, total_steps=100)
    assert (sched.k_min, sched.k_max) == (0, 80)
    for k, printed in WORKED_TABLE[mode].items():
        digits = len(printed.split(".")[1]) if "." in printed else 0
        value = sched(k)
        # the printed number is the value rounded (half up) to its printed digits
        assert abs(value - float(printed)) <= 0.5 * 10 ** (-digits) + 1e-12, (mode, k, value, printed)
    for k in (80, 81, 100, 1000):  # "k >= 80" column
        assert sched(k) == 0.0


def test_worked_table_exact_expressions():
    # the same cells from the code's expressions, evaluated in the code's order
    lin = TemporalSchedule("linear", total_steps=100)
    assert lin(1) == 0.99 * (1 - 1 / 80)
    assert lin(40) == 0.99 * (1 - 40 / 80) == 0.495
    gam = TemporalSchedule("gamma", total_steps=100)
    assert gam(20) == (0.99 * (1 - 20 / 80)) ** 2.0


def _sig(x):
    return 1.0 / (1.0 + math.exp(8.0 * (x - 0.5)))


def spec_value(mode, k, start, end_value, begin, end, total, gamma):
    """schedules.md 'Common frame' + profile table, re-typed."""
    k_min, k_max = int(total * begin), int(total * end)
    p = min(max((k - k_min) / (k_max - k_min), 0.0), 1.0)
    if mode == "gamma":
        return (start * (1 - p)) ** gamma
    f = {
        "linear": lambda: 1 - p,
        "sigmoid": lambda: (_sig(p) - _sig(1)) / (_sig(0) - _sig(1)),
        "cosine": lambda: 0.5 * (1 + math.cos(math.pi * p)),
        "rex": lambda: (1 - p) / (0.5 + 0.5 * (1 - p)),
        "step": lambda: 1.0 if p < 1 else 0.0,
        "constant": lambda: 1.0,
    }[mode]()
    return end_value + (start - end_value) * f


MODES = ("linear", "sigmoid", "gamma", "cosine", "rex", "step", "constant")


@settings(max_examples=60, deadline=None)
@given(
    mode=st.sampled_from(MODES),
    total=st.integers(2, 500),
    begin=st.floats(0.0, 0.5),
    span=st.floats(0.05, 0.5),
    start=st.floats(0.0, 1.0),
    end_value=st.floats(0.0, 1.0),
    gamma=st.floats(0.25, 4.0),
    frac=st.floats(0.0, 1.5),
)
def test_matches_spec_formula(mode, total, begin, span, start, end_value, gamma, frac):
    end = min(begin + span, 1.0)
    if int(total * end) <= int(total * begin):
        with pytest.raises(ValueError, match="end"):
            TemporalSchedule(mode, start_value=start, end_value=0.0, begin=begin, end=end, total_steps=total)
        return
    if mode == "gamma":
        end_value = 0.0
    sched = TemporalSchedule(
        mode, start_value=start, end_value=end_value, begin=begin, end=end, total_steps=total, gamma=gamma
    )
    k = max(1, int(frac * total))
    want = spec_value(mode, k, start, end_value, begin, end, total, gamma)
    assert sched(k) == pytest.approx(want, rel=1e-12, abs=1e-15)
    # before k_min: start_value (gamma: start ** gamma), at/after k_max: end_value (gamma: 0)
    if sched.k_min >= 1:
        before = start**gamma if mode == "gamma" else start
        assert sched(1) == pytest.approx(before, rel=1e-12, abs=1e-15)
    after = 0.0 if mode in ("gamma",) else (start if mode == "constant" else end_value)
    assert sched(sched.k_max) == pytest.approx(after, rel=1e-12, abs=1e-15)
    assert sched(sched.k_max + 7) == pytest.approx(after, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("mode", MODES)
def test_decreasing_and_in_range(mode):
    sched = TemporalSchedule(mode, start_value=0.9, end_value=0.0, begin=0.1, end=0.7, total_steps=50)
    vals = [sched(k) for k in range(1, 61)]
    assert all(0.0 <= v <= 1.0 for v in vals)
    assert all(a >= b - 1e-15 for a, b in zip(vals, vals[1:])), vals


def test_profile_shapes_at_midpoint():
    # p = 0.5 exactly: T = 100, begin 0, end 1 -> k_max 100, k = 50
    kw = dict(start_value=1.0, end_value=0.0, begin=0.0, end=1.0, total_steps=100)
    assert TemporalSchedule("linear", **kw)(50) == pytest.approx(0.5)
    assert TemporalSchedule("cosine", **kw)(50) == pytest.approx(0.5)
    assert TemporalSchedule("rex", **kw)(50) == pytest.approx(2.0 / 3.0)  # REX stays above linear
    assert TemporalSchedule("sigmoid", **kw)(50) == pytest.approx(0.5)
    assert TemporalSchedule("step", **kw)(99) == 1.0 and TemporalSchedule("step", **kw)(100) == 0.0
    assert TemporalSchedule("constant", **kw)(100) == 1.0
    # an increasing schedule (end_value > start_value) is allowed
    inc = TemporalSchedule("linear", start_value=0.2, end_value=1.0, begin=0.0, end=1.0, total_steps=100)
    assert inc(50) == pytest.approx(0.6) and inc(100) == 1.0


def test_default_mode_and_forking_rho():
    sched = TemporalSchedule(total_steps=100)
    assert sched.mode == "linear" and sched.start_value == 0.99 and sched.end == 0.8
    assert 1 - sched(1) == pytest.approx(0.022375)  # forking/D^3S keep-fraction starts small and grows to 1
    assert 1 - sched(80) == 1.0


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="mode"):
        TemporalSchedule("uba", total_steps=10)  # UBA is deliberately not offered (no citable closed form)
    with pytest.raises(ValueError, match="mode"):
        TemporalSchedule("exponential", total_steps=10)
    with pytest.raises(ValueError, match="end"):
        TemporalSchedule(total_steps=10, begin=0.5, end=0.55)  # k_min = k_max = 5
    with pytest.raises(ValueError, match="end"):
        TemporalSchedule(total_steps=10, begin=0.8, end=0.2)
    with pytest.raises(ValueError, match="start_value"):
        TemporalSchedule(total_steps=10, start_value=1.5)
    with pytest.raises(ValueError, match="end_value"):
        TemporalSchedule(total_steps=10, end_value=-0.1)
    with pytest.raises(ValueError, match="start_value"):
        TemporalSchedule(total_steps=10, start_value=float("nan"))
    with pytest.raises(ValueError, match="begin"):
        TemporalSchedule(total_steps=10, begin=-0.1)
    with pytest.raises(ValueError, match="end_value"):
        TemporalSchedule("gamma", total_steps=10, end_value=0.1)
    with pytest.raises(ValueError, match="total_steps"):
        TemporalSchedule(total_steps=0)
    with pytest.raises(TypeError, match="total_steps"):
        TemporalSchedule(total_steps=10.0)
    with pytest.raises(ValueError, match="gamma"):
        TemporalSchedule("gamma", total_steps=10, gamma=0.0)
    with pytest.raises(TypeError):
        TemporalSchedule()  # total_steps is required
    sched = TemporalSchedule(total_steps=10)
    with pytest.raises(ValueError, match="step"):
        sched(0)
    with pytest.raises(ValueError, match="step"):
        sched(-3)
    with pytest.raises(TypeError, match="step"):
        sched(1.5)
    with pytest.raises(TypeError, match="step"):
        sched(True)


def test_pickle_repr_dict_roundtrip():
    sched = TemporalSchedule("sigmoid", start_value=0.9, end_value=0.1, begin=0.1, end=0.9, total_steps=77, gamma=3.0)
    clone = pickle.loads(pickle.dumps(sched))
    assert clone == sched and clone(30) == sched(30)
    assert "TemporalSchedule(" in repr(sched) and "mode='sigmoid'" in repr(sched) and "total_steps=77" in repr(sched)
    assert eval(repr(sched), {"TemporalSchedule": TemporalSchedule}) == sched
    d = sched.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert TemporalSchedule.from_dict(d) == sched
    assert TemporalSchedule.from_dict({"total_steps": 5}) == TemporalSchedule(total_steps=5)
    with pytest.raises(ValueError, match="unknown"):
        TemporalSchedule.from_dict({**d, "warmup": 3})
    with pytest.raises(ValueError, match="total_steps"):
        TemporalSchedule.from_dict({"mode": "linear"})
    with pytest.raises(AttributeError):
        sched.mode = "linear"
    assert hash(clone) == hash(sched)
    assert rlvr_kernels.TemporalSchedule is TemporalSchedule
