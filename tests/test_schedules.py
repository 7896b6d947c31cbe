import pytest

from overtrain.train.schedules import Schedule


def test_cosine_warms_up_then_anneals_to_zero():
    s = Schedule("cosine", peak_lr=1.0, total_steps=100, warmup_steps=10)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    after = [s(t) for t in range(10, 101)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert s(55) == pytest.approx(0.5, abs=0.02)
    assert s(100) == pytest.approx(0.0, abs=1e-12)


def test_constant_stays_at_peak():
    s = Schedule("constant", peak_lr=3e-3, total_steps=50, warmup_steps=5)
    assert [s(t) for t in range(5, 200)] == [3e-3] * 195


def test_wsd_branch_is_the_constant_run_until_it_decays_linearly_to_zero():
    stable = Schedule("constant", 1.0, 100, 10)
    branch = Schedule("wsd", 1.0, total_steps=100, warmup_steps=10, decay_start=80)
    assert [branch(t) for t in range(80)] == [stable(t) for t in range(80)]
    assert branch(90) == pytest.approx(0.5)
    assert branch(100) == 0.0


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="schedule='step'"):
        Schedule("step", 1.0, 10)
