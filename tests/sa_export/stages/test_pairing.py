"""Side-by-side timing: interleaved pairs, alternating order, bounded by repeats, time and pairs."""

from sa_export.stages.pairing import paired_times


def test_pairs_alternate_their_order_and_stop_at_the_bounds():
    calls = []

    def call(name):
        def timed():
            calls.append(name)
            return float(len(calls))
        return timed

    t_sa, t_base = paired_times(call("sa"), call("base"), repeats=3, min_seconds=0.0, max_pairs=10)
    assert len(t_sa) == len(t_base) == 3
    assert calls == ["base", "sa", "sa", "base", "base", "sa"]
    assert t_sa == [2.0, 3.0, 6.0] and t_base == [1.0, 4.0, 5.0]  # each model keeps its own times
    # a time bound keeps pairing up to max_pairs
    t_sa, _ = paired_times(call("sa"), call("base"), repeats=1, min_seconds=60.0, max_pairs=7)
    assert len(t_sa) == 7


def test_ratio_interval_takes_the_sign_tests_order_statistics():
    from sa_export.stages.pairing import ratio_interval

    base = [1.0] * 20
    sa = [0.9 + 0.01 * i for i in range(20)]  # ratios 0.90 .. 1.09, shuffled below
    order = [7, 3, 19, 0, 12, 5, 16, 1, 9, 14, 2, 18, 6, 11, 4, 17, 8, 13, 10, 15]
    low, high = ratio_interval([sa[i] for i in order], base)
    assert (round(low, 4), round(high, 4)) == (0.95, 1.04)  # ranks 6 and 15 of 20: 95.9% coverage
    assert ratio_interval([1.1, 1.2, 1.3], [1.0] * 3) == (1.1, 1.3)  # few pairs: the whole range
    low, high = ratio_interval([2.0 + 0.001 * i for i in range(40)], [1.0] * 40)
    assert 2.0 < low < high < 2.039  # all slower: the interval lies above 1


def test_verdict_tells_a_measured_slowdown_from_noise():
    from sa_export.stages.pairing import verdict_lines

    rows = [
        ("256x1", {"time_ratio_sa_to_base": 1.02, "time_ratio_ci95": [0.97, 1.06]}),  # noise
        ("2048x1", {"time_ratio_sa_to_base": 1.08, "time_ratio_ci95": [1.03, 1.12]}),  # slower
        ("8192x1", {"time_ratio_sa_to_base": 0.90, "time_ratio_ci95": [0.88, 0.93]}),
    ]
    assert verdict_lines("decode", rows) == [
        "decode: SA slower than the baseline at: 2048x1 (95% interval above 1)",
        "decode: SA/base above 1 within step-to-step noise (95% interval holds 1) at: 256x1",
    ]
    assert verdict_lines("decode", rows[2:]) == ["decode: SA is not slower than the baseline beyond step-to-step noise at any point"]
