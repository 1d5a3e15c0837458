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


def test_pairs_go_on_until_the_ratio_interval_is_as_narrow_as_asked():
    import random

    from sa_export.stages.pairing import ratio_interval

    noise = random.Random(0)

    def noisy():
        return 1.0 + noise.gauss(0, 0.05)

    # 5% noise per step: 5 pairs give an interval of about +-5%; +-1% needs many more
    t_sa, t_base = paired_times(noisy, noisy, repeats=5, min_seconds=0.0, max_pairs=5, half_width=0.01, max_seconds=60.0)
    low, high = ratio_interval(t_sa, t_base)
    assert (high - low) / 2 <= 0.01 and len(t_sa) > 50
    # the checks come as the pairs grow by a quarter: it stops within a quarter of the pairs it needed
    low, high = ratio_interval(t_sa[: len(t_sa) * 4 // 5 - 1], t_base[: len(t_base) * 4 // 5 - 1])
    assert (high - low) / 2 > 0.01 * 0.9
    # max_seconds bounds it: no time, no pairs beyond repeats
    t_sa, _ = paired_times(noisy, noisy, repeats=5, min_seconds=0.0, max_pairs=5, half_width=0.001, max_seconds=0.0)
    assert len(t_sa) == 5


def test_ratio_interval_brackets_the_ratio_of_medians():
    import random

    from sa_export.stages.pairing import ratio_interval

    noise = random.Random(0)
    base = [1.0 + noise.gauss(0, 0.05) for _ in range(200)]
    slower = [1.03 * b + noise.gauss(0, 0.01) for b in base]  # 3% slower, pair by pair
    low, high = ratio_interval(slower, base)
    assert 1.0 < low < 1.03 < high < 1.06
    assert ratio_interval(slower, base) == (low, high)  # seeded
    same = [b * (1 + noise.gauss(0, 0.05)) for b in base]  # no difference, much noise
    low, high = ratio_interval(same, base)
    assert low < 1.0 < high
    assert ratio_interval([1.1, 1.2], [1.0, 1.0]) == (1.1, 1.2)  # two pairs: within their range


def test_verdict_tells_a_measured_slowdown_from_noise():
    from sa_export.stages.pairing import verdict_lines

    rows = [
        ("256x1", {"time_ratio_sa_to_base": 1.02, "time_ratio_ci95": [0.97, 1.06]}),  # noise
        ("2048x1", {"time_ratio_sa_to_base": 1.08, "time_ratio_ci95": [1.03, 1.12]}),  # slower
        ("8192x1", {"time_ratio_sa_to_base": 0.90, "time_ratio_ci95": [0.88, 0.93]}),
    ]
    assert verdict_lines("decode", rows) == [
        "decode: SA slower than the baseline at: 2048x1 (95% interval above 1)",
        "decode: SA/base above 1 within the measured noise (95% interval holds 1) at: 256x1",
    ]
    assert verdict_lines("decode", rows[2:]) == ["decode: SA is not slower than the baseline beyond the measured noise at any point"]


def test_grouped_interval_covers_the_spread_between_pairs_of_processes():
    import random

    from sa_export.stages.pairing import grouped_ratio, grouped_ratio_interval, ratio_interval

    noise = random.Random(1)
    groups = []
    for offset in (0.97, 1.00, 1.03):  # each pair of processes runs SA at a speed of its own
        base = [1.0 + noise.gauss(0, 0.01) for _ in range(100)]
        groups.append(([offset * b + noise.gauss(0, 0.002) for b in base], base))
    ratio = grouped_ratio(groups)
    assert abs(ratio - 1.0) < 0.005  # each pair of processes weighs the same
    low, high = grouped_ratio_interval(groups)
    assert low < 0.985 and high > 1.015  # the processes' spread, not only the steps'
    for group in groups:  # each one alone is far narrower and misses the others
        one_low, one_high = ratio_interval(*group)
        assert one_high - one_low < (high - low) / 4
    assert grouped_ratio_interval(groups[:1]) == ratio_interval(*groups[0])
    assert grouped_ratio([([2.0, 2.0], [1.0, 1.0]), ([1.0], [3.0])]) == 3.0 / 4.0
