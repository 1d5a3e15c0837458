import math
import sys

import numpy as np
import pytest

from sa_export.benchmarks import interval_blocks


def test_the_error_of_blocks_is_the_deviation_of_their_means_over_the_root_of_their_number():
    differences = np.array([0.1, 0.1, 0.3, 0.3, 0.1, 0.1, 0.3, 0.3, 0.5])  # the ninth is left over
    blocks, error = interval_blocks.block_errors(differences, 2)
    assert blocks == 4 and error == pytest.approx(math.sqrt(4 * 0.1**2 / 3) / 2)
    assert interval_blocks.block_errors(differences, 4) == (2, pytest.approx(0.0))  # 0.2 and 0.2


@pytest.mark.parametrize("blocks, message", [("0", "leave two blocks"), ("512,9000", "leave two blocks"), ("512,x", "comma-separated numbers")])
def test_bad_block_lengths_are_refused_before_the_model_loads(blocks, message, monkeypatch, capsys):
    monkeypatch.setattr(interval_blocks, "load_for_reference", lambda *_: pytest.fail("loaded the model"))
    monkeypatch.setattr(sys, "argv", ["interval_blocks", "--tokens", "16384", "--blocks", blocks])
    with pytest.raises(SystemExit) as exit_info:
        interval_blocks.main()
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
