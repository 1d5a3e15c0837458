import pytest

from sa_export.core.errors import UsageError
from targets.profiles import PROFILES, get_target
from tests.helpers import run_cli


def test_registry_has_the_orin_family_and_desktops():
    for name in ("jetson-orin-agx-64gb", "jetson-orin-agx-32gb", "jetson-orin-nx-16gb", "jetson-orin-nano-8gb", "desktop-ampere", "desktop-ada", "hopper", "cpu"):
        assert name in PROFILES
    orin = get_target("jetson-orin")
    assert orin.name == "jetson-orin-nano-8gb" and orin.gpu_arch == "sm_87" and orin.builds_on_device
    assert (orin.jetpack, orin.tensorrt, orin.cuda) == ("7.2", "10.16", "13.2")
    older = get_target("jetson-orin-jp6")
    assert (older.name, older.jetpack, older.tensorrt, older.cuda) == ("jetson-orin-nano-8gb-jp6", "6.2", "10.3", "12.6")
    assert get_target("desktop-ada").strongly_typed_only and not orin.strongly_typed_only
    with pytest.raises(UsageError, match="unknown target"):
        get_target("jetson-tx2")


def test_targets_command_lists_memory():
    result = run_cli("targets")
    assert result.exit_code == 0
    assert "jetson-orin-nano-8gb" in result.output and "8 GiB" in result.output and "jetson-orin -> jetson-orin-nano-8gb" in result.output


def test_the_parser_data_knows_which_tensorrt_imports_which_op():
    from targets.compat import max_opset, parses

    assert max_opset((10, 3)) == 20 and max_opset((10, 16)) == 24 and max_opset((11, 5)) == 25
    for op in ("TensorScatter", "RotaryEmbedding", "RMSNormalization"):
        assert not parses(op, (10, 3)) and not parses(op, (10, 14)) and parses(op, (10, 15)) and parses(op, (11, 5))
    assert not parses("Attention", (10, 13)) and parses("Attention", (10, 14))
    assert parses("MatMul", (10, 3)) and not parses("Unique", (11, 5))


def test_a_graph_with_an_op_the_older_parser_lacks_is_refused_for_jetpack_6_only():
    import onnx_ir as ir

    from targets.compat import check_compatibility

    x = ir.val("x", ir.DataType.FLOAT, [1, 2, 4, 8])
    node = ir.node("RMSNormalization", [x, ir.val("scale", ir.DataType.FLOAT, [8])], name="norm")
    model = ir.Model(ir.Graph([x, node.inputs[1]], node.outputs, nodes=[node], opset_imports={"": 23}), ir_version=10)
    old = check_compatibility(model, get_target("jetson-orin-jp6"), [])
    assert any("does not import RMSNormalization (from 10.15)" in p for p in old.problems)
    assert any("opset 23 is outside TensorRT 10.3's range 9-20" in p for p in old.problems)
    new = check_compatibility(model, get_target("jetson-orin"), [])
    assert [p for p in new.problems if "RMSNormalization" in p or "opset" in p] == []
