import sys

import pytest

from sa_export.benchmarks import heal


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--hidden-weight", "-1"], "--hidden-weight, --adapter-weight-decay and --extra-source-layers must be at least 0"),
        (["--adapter-weight-decay", "-0.5"], "--hidden-weight, --adapter-weight-decay and --extra-source-layers must be at least 0"),
        (["--extra-source-layers", "-1"], "--hidden-weight, --adapter-weight-decay and --extra-source-layers must be at least 0"),
        (["--chunk-tokens", "0"], "must be at least 1"),
        (["--configs", "fit-9"], "unknown configs fit-9"),
        (["--more-texts", "no-such-text.txt"], "--more-texts: no file no-such-text.txt"),
        (["--soft-target-temperature", "0"], "--soft-target-temperature must be above 0"),
        (["--correction-scales", "1,half"], "--correction-scales and --seeds take comma-separated numbers, not '1,half' and '0'"),
        (["--seeds", "0,x"], "not '1' and '0,x'"),
    ],
)
def test_bad_options_are_refused_before_the_model_loads(arguments, message, monkeypatch, capsys):
    monkeypatch.setattr(heal, "load_for_reference", lambda *_: pytest.fail("loaded the model"))
    monkeypatch.setattr(sys, "argv", ["heal", *arguments])
    with pytest.raises(SystemExit) as exit_info:
        heal.main()
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_the_soup_of_fitted_maps_reads_each_source_with_the_mean_of_their_weights():
    sources = (((2, 0), (2, 1)), ((2, 0), (2, 1)))
    fits = [{3: heal.HeadMap(sources, ((0.8, 0.2), (1.0, 0.0)))}, {3: heal.HeadMap(sources, ((0.4, 0.6), (0.0, 1.2)))}]
    soup = heal._average_maps(fits)[3]
    assert soup.sources == sources
    assert [list(head) for head in soup.weights] == [pytest.approx([0.6, 0.4]), pytest.approx([0.5, 0.6])]


def test_the_soup_of_fitted_temperatures_is_their_mean_per_head_and_none_when_none_were_fitted():
    import torch

    soup = heal._average_temperatures([{3: torch.tensor([0.2, -0.4])}, {3: torch.tensor([0.4, 0.0])}])
    assert soup[3].tolist() == pytest.approx([0.3, -0.2])
    assert heal._average_temperatures([None, None]) is None


def test_a_row_gives_each_penalty_with_its_interval_and_its_fraction_of_identitys(capsys):
    import math

    import torch

    base = torch.full((2048,), 2.0, dtype=torch.float64)
    identity = base + 0.4
    fitted = base + torch.tensor([0.05, 0.15], dtype=torch.float64).repeat_interleave(512).repeat(2)  # blocks of 512 tokens: 0.1 more loss on average
    rows = []
    heal._report(rows, "26-29", "fit-2+lora", {"news": fitted}, {"news": base}, {"news": identity}, 12.0, 64)
    cell = rows[0]["texts"]["news"]
    assert cell["ppl"] == pytest.approx(math.exp(2.1))
    assert cell["penalty_percent"] == pytest.approx(100 * math.expm1(0.1))
    assert cell["of_identity"] == pytest.approx(math.expm1(0.1) / math.expm1(0.4))
    error = 3.18244630528 * 0.1 / math.sqrt(3) / 2  # t (3 degrees of freedom) times the block means' deviation over the root of 4 blocks
    assert cell["penalty_interval"] == pytest.approx({"low": math.expm1(0.1 - error), "high": math.expm1(0.1 + error), "confidence": 0.95, "blocks": 4, "block_tokens": 512})
    assert "news 8.17 (+10.5% [+0.8 to +21.2], 0.21)" in capsys.readouterr().out


def test_the_copy_breakdown_marks_tokens_whose_pair_the_window_held_and_splits_the_penalty_there():
    import torch

    from sa_export.accuracy.evaluate import copied_tokens

    # windows of 5: [1 2 3 1 2] scores 2 3 1 2 (the second "1 2" copied), [3 4 1 2] scores 4 1 2 (a new window forgets)
    copied = copied_tokens([1, 2, 3, 1, 2, 3, 4, 1, 2], 5)
    assert copied.tolist() == [False, False, False, True, False, False, False]
    split = heal._penalty_on(copied, torch.tensor([0.1, 0.1, 0.1, 0.7, 0.0, 0.0, 0.0], dtype=torch.float64))
    assert split == pytest.approx({"share_of_tokens": 1 / 7, "share_of_penalty": 0.7, "mean_copied": 0.7, "mean_other": 0.05})
