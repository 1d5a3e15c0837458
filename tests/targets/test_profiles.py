import pytest

from sa_export.core.errors import UsageError
from targets.profiles import PROFILES, get_target
from tests.helpers import run_cli


def test_registry_has_the_orin_family_and_desktops():
    for name in ("jetson-orin-agx-64gb", "jetson-orin-agx-32gb", "jetson-orin-nx-16gb", "jetson-orin-nano-8gb", "desktop-ampere", "desktop-ada", "hopper", "cpu"):
        assert name in PROFILES
    orin = get_target("jetson-orin")
    assert orin.name == "jetson-orin-nano-8gb" and orin.gpu_arch == "sm_87" and orin.tensorrt == "10.3" and orin.builds_on_device
    assert get_target("desktop-ada").strongly_typed_only and not orin.strongly_typed_only
    with pytest.raises(UsageError, match="unknown target"):
        get_target("jetson-tx2")


def test_targets_command_lists_memory():
    result = run_cli("targets")
    assert result.exit_code == 0
    assert "jetson-orin-nano-8gb" in result.output and "8 GiB" in result.output and "jetson-orin -> jetson-orin-nano-8gb" in result.output
