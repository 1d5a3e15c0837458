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
