import subprocess
import sys

from sa_export.core import choices


def test_the_command_line_offers_what_the_packages_implement():
    from sa_export.export import EXPORTERS

    assert choices.EXPORTER_NAMES == tuple(EXPORTERS)
    assert choices.DEFAULT_EXPORTER in EXPORTERS and not set(choices.REMOVED_EXPORTERS) & set(EXPORTERS)
    assert choices.CALIBRATED_DEFAULT in choices.HEAD_MAP_MODES and "fit" in choices.FITTED_MODES


def test_parsing_the_command_line_loads_no_framework():
    """`sa-export --help` and option errors answer in a fraction of a second, and a Ctrl-C
    while a command loads torch meets its handler (exit 130), not an import's traceback."""
    code = (
        "import sys; from click.testing import CliRunner; from sa_export.cli import main; "
        "result = CliRunner().invoke(main, ['convert', '--help']); assert result.exit_code == 0, result.output; "
        "print(sorted(m for m in ('torch', 'transformers', 'onnxruntime', 'onnx_ir', 'scipy') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
