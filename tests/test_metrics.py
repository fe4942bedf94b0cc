"""MFU is never reported above 100%: such a number means the peak it divides by was measured
(or configured) too low. Peaks and the clock are injected; nothing here is timed."""

from __future__ import annotations

import pytest

from rnd1.metrics import MetricsLogger, Throughput


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _one_second(th: Throughput, clock: FakeClock, tokens: int) -> dict:
    th.update(tokens)
    clock.now += 1.0
    return th.report()


def test_plausible_mfu_is_reported_and_the_peak_not_remeasured():
    clock, calls = FakeClock(), []
    th = Throughput(flops_per_token=10.0, peak_flops=2e4, world_size=1, clock=clock,
                    remeasure_peak=lambda: calls.append(1) or 9e9)
    out = _one_second(th, clock, 1000)  # 1e4 FLOP/s of a 2e4 peak
    assert out["mfu"] == pytest.approx(0.5) and out["tokens_per_s"] == pytest.approx(1000)
    assert not calls and "mfu_peak_too_low" not in out


def test_mfu_over_100_percent_remeasures_the_peak_once():
    clock, peaks = FakeClock(), [4e4]
    th = Throughput(flops_per_token=10.0, peak_flops=1e3, world_size=2, clock=clock,
                    remeasure_peak=lambda: peaks.pop())
    out = _one_second(th, clock, 4000)  # 2e4 FLOP/s per process: 2000% of the start-up peak
    assert out["mfu"] == pytest.approx(0.5) and out["peak_tflops_remeasured"] == pytest.approx(4e-8)
    assert th.peak_flops == 4e4 and not peaks


def test_mfu_still_over_100_percent_is_flagged_not_printed(capsys):
    clock, calls = FakeClock(), []
    th = Throughput(flops_per_token=10.0, peak_flops=1e3, world_size=1, clock=clock,
                    remeasure_peak=lambda: calls.append(1) or 500.0)  # measured even lower: keep the larger
    first = _one_second(th, clock, 141)  # 1410 FLOP/s: the 141% of the issue
    second = _one_second(th, clock, 141)
    assert len(calls) == 1 and th.peak_flops == 1e3
    for out in (first, second):
        assert out["mfu"] is None and out["mfu_peak_too_low"] is True
    MetricsLogger(None).log(10, {"loss": 1.0, **first})
    line = capsys.readouterr().out
    assert "mfu n/a (>100%: peak FLOP/s measured too low)" in line and "141.0%" not in line


def test_configured_peak_too_low_is_flagged_without_remeasuring():
    clock = FakeClock()
    th = Throughput(flops_per_token=1.0, peak_flops=10.0, world_size=1, clock=clock)
    out = _one_second(th, clock, 100)
    assert out["mfu"] is None and out["mfu_peak_too_low"] is True


def test_the_matmul_peak_is_a_median_so_one_lucky_run_does_not_set_it(monkeypatch):
    """Issue 32: the best of 5 swung the peak (and MFU) 10x between runs on a shared machine."""
    import rnd1.metrics as M

    def ticks():
        t = 0.0
        for d in [0.01, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]:  # one run 100x faster than the rest
            yield t
            t += d
            yield t

    clock = ticks()
    monkeypatch.setattr(M.time, "perf_counter", lambda: next(clock))
    assert M.measure_matmul_peak(n=256, reps=7) == 2 * 256**3 / 1.0
    assert "median" in M.MATMUL_PEAK_HOW
