import sys

import pytest

from sa_export.benchmarks import interval_blocks


@pytest.mark.parametrize("blocks, message", [("0", "leave two blocks"), ("512,9000", "leave two blocks"), ("512,x", "comma-separated numbers")])
def test_bad_block_lengths_are_refused_before_the_model_loads(blocks, message, monkeypatch, capsys):
    monkeypatch.setattr(interval_blocks, "load_for_reference", lambda *_: pytest.fail("loaded the model"))
    monkeypatch.setattr(sys, "argv", ["interval_blocks", "--tokens", "16384", "--blocks", blocks])
    with pytest.raises(SystemExit) as exit_info:
        interval_blocks.main()
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
