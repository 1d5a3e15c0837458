import torch

from sa_export.accuracy.reference import shared_attention
from sa_export.benchmarks.partial_anchors import nearest_anchors
from sa_export.core.plan import build_plan
from tests.conftest import build_sharp_llama

GROUPS = {"kv_heads": 2, "num_heads": 4}  # the tiny Llama's: heads 0-1 read KV group 0, heads 2-3 group 1


def test_a_layer_anchors_on_the_last_layer_not_shared_whole():
    plan = build_plan(["2.1", "3", "4.0", "5"], 6, **GROUPS)
    assert plan.anchors == {2: 1, 3: 1, 4: 1, 5: 1}
    assert nearest_anchors(plan).anchors == {2: 1, 3: 2, 4: 2, 5: 4}
    assert nearest_anchors(plan).shared_groups == plan.shared_groups


@torch.no_grad()
def test_a_partly_shared_anchor_lends_what_it_borrows_and_its_own_heads(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(build_sharp_llama(tmp_path / "sharp"), attn_implementation="eager").eval()
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))

    def logits(plan):
        with shared_attention(model, plan):
            return model(ids).logits

    # Group 1 of layer 3 reads group 1 of layer 2, which layer 2 borrows from layer 1: the same heads either way.
    same = build_plan(["2.1", "3.1"], 6, **GROUPS)
    torch.testing.assert_close(logits(nearest_anchors(same)), logits(same), rtol=0, atol=0)
    # Group 0 of layer 3 now reads layer 2's own group 0, not layer 1's.
    other = build_plan(["2.1", "3.0"], 6, **GROUPS)
    assert (logits(nearest_anchors(other)) - logits(other)).abs().max() > 1e-3
