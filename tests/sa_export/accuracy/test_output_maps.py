import numpy as np
import torch

from sa_export.accuracy.output_maps import output_errors, output_head_maps
from sa_export.core.plan import build_plan
from sa_export.hf.models import ModelSource, load_hf_model


def test_output_errors_measure_each_anchor_head_against_the_heads_own_attention_output(tiny_llama):
    """The target is read where the model itself has it (o_proj's input), independently of
    the values and maps the errors are computed from."""
    model = load_hf_model(ModelSource("hf", tiny_llama, "tiny"))
    plan = build_plan(["3-4"], 6)
    ids = np.random.default_rng(1).integers(0, 256, 2 * 32).tolist()
    errors = output_errors(model, plan, ids, chunk_tokens=32)
    assert sorted(errors) == [3, 4] and errors[3].shape == (4, 4) and (errors[3] >= 0).all()

    heads, kv, d = 4, 2, 16
    expected = np.zeros((heads, heads))
    captured = {}
    attention = model.model.layers[3].self_attn
    hooks = [
        attention.v_proj.register_forward_hook(lambda m, a, out: captured.__setitem__("v", out[0])),
        attention.o_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("context", a[0][0])),
    ]
    with torch.no_grad():
        for chunk in (ids[:32], ids[32:]):
            probs = model(input_ids=torch.tensor([chunk]), output_attentions=True).attentions[2][0].double()
            v = captured["v"].reshape(32, kv, d).double()
            context = captured["context"].reshape(32, heads, d).double()
            for h in range(heads):
                for j in range(heads):
                    expected[h, j] += ((probs[j] @ v[:, h // 2] - context[:, h]) ** 2).sum().item()
    for hook in hooks:
        hook.remove()
    np.testing.assert_allclose(errors[3], expected, rtol=1e-4, atol=1e-8)
    maps = output_head_maps(errors, plan)
    assert [pairs[0] for pairs in maps[3].sources] == [(2, int(j)) for j in expected.argmin(1)]
