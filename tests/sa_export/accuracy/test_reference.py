import math

import torch

from sa_export.core.plan import HeadMap, SharingPlan, build_plan
from sa_export.accuracy.reference import shared_attention
from tests.conftest import _tiny_config


def _model():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = _tiny_config("llama")
    config._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


@torch.no_grad()
def test_without_a_plan_the_patched_model_is_the_eager_model():
    model = _model()
    ids = torch.randint(0, 256, (2, 11))
    base = model(ids).logits
    with shared_attention(model, None):
        patched = model(ids).logits
    assert torch.equal(base, patched)
    assert model.config._attn_implementation == "eager"  # restored


@torch.no_grad()
def test_shared_layer_computes_anchor_probs_times_its_own_values():
    model = _model()
    ids = torch.randint(0, 256, (1, 9))
    plan = build_plan(["3"], 6)
    captured = {}
    layer3 = model.model.layers[3].self_attn

    def grab(module, args, kwargs, output):
        captured["out"] = output[0]
        captured["probs"] = output[1]

    def grab_v(module, args, output):
        captured["v"] = output

    h1 = layer3.register_forward_hook(grab, with_kwargs=True)
    h2 = layer3.v_proj.register_forward_hook(grab_v)
    with shared_attention(model, plan):
        sa_logits = model(ids).logits
    h1.remove(), h2.remove()
    base_logits = model(ids).logits
    assert not torch.allclose(sa_logits, base_logits)

    # Recompute layer 3's context by hand from the anchor's (layer 2's) probabilities.
    anchor_probs = {}

    def grab_anchor(module, args, output):
        anchor_probs["p"] = output[1]

    hook = model.model.layers[2].self_attn.register_forward_hook(grab_anchor)
    with shared_attention(model, plan):
        model(ids)
    hook.remove()
    assert torch.equal(captured["probs"], anchor_probs["p"])
    v = captured["v"].view(1, 9, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1)
    context = (anchor_probs["p"] @ v).transpose(1, 2).reshape(1, 9, 64)
    assert torch.allclose(layer3.o_proj(context), captured["out"], atol=1e-6)


@torch.no_grad()
def test_head_map_permutes_anchor_heads():
    model = _model()
    ids = torch.randint(0, 256, (1, 7))
    identity = SharingPlan(6, {3: 2})
    swapped = SharingPlan(6, {3: 2}, {3: HeadMap.from_anchor_heads(2, (1, 0, 3, 2))})
    with shared_attention(model, identity):
        a = model(ids).logits
    with shared_attention(model, swapped):
        b = model(ids).logits
    assert not torch.allclose(a, b)


def test_a_temperature_sharpens_each_heads_mixture_and_keeps_its_gain():
    from sa_export.accuracy.reference import mix_probs
    from sa_export.core.plan import HeadMap

    probs = torch.softmax(torch.randn(1, 2, 3, 5), -1) * torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])  # a masked column
    stored = {0: probs}
    head_map = HeadMap(tuple(((0, 0), (0, 1)) for _ in range(2)), ((0.6, 0.6), (0.5, 0.25)))  # gains 1.2 and 0.75
    plain = mix_probs(stored, head_map)
    assert torch.allclose(mix_probs(stored, head_map, log_temperature=torch.zeros(2)), plain, atol=1e-6)
    log_t = torch.tensor([0.0, math.log(3.0)], requires_grad=True)
    sharp = mix_probs(stored, head_map, log_temperature=log_t)
    assert torch.allclose(sharp.sum(-1), plain.sum(-1), atol=1e-6)  # gains kept
    assert torch.all(sharp[..., 4] == 0)  # masked positions stay masked
    expected = plain[:, 1] ** 3 / (plain[:, 1] ** 3).sum(-1, keepdim=True) * plain[:, 1].sum(-1, keepdim=True)
    assert torch.allclose(sharp[:, 1], expected, atol=1e-6)
    sharp.sum().backward()
    assert torch.isfinite(log_t.grad).all()
    # a map of one source per head (width 1, no weights) is sharpened too
    single = HeadMap.from_anchor_heads(0, [1, 0])
    squared = mix_probs(stored, single, log_temperature=torch.full((2,), math.log(2.0)))
    borrowed = probs[:, [1, 0]]
    expected = borrowed**2 / (borrowed**2).sum(-1, keepdim=True) * borrowed.sum(-1, keepdim=True)  # the row's mass kept
    assert torch.allclose(squared, expected, atol=1e-6)


@torch.no_grad()
def test_shared_heads_borrow_only_for_the_listed_heads():
    model = _model()
    ids = torch.randint(0, 256, (1, 8))
    plan = build_plan(["3"], 6)
    seen = {}

    def grab(layer):
        def hook(module, args, output):
            seen[layer] = output[1]
        return hook

    hooks = [model.model.layers[layer].self_attn.register_forward_hook(grab(layer)) for layer in (2, 3)]
    model(ids)
    own = seen[3]
    with shared_attention(model, plan, shared_heads={3: (0, 1)}):  # KV group 0 of 2
        partial = model(ids).logits
    anchor, mixed = seen[2], seen[3]
    with shared_attention(model, plan, shared_heads={3: (0, 1, 2, 3)}):
        every_head = model(ids).logits
    with shared_attention(model, plan):
        whole = model(ids).logits
    for hook in hooks:
        hook.remove()
    assert torch.equal(mixed[:, :2], anchor[:, :2])  # the listed heads read the anchor's
    assert torch.equal(mixed[:, 2:], own[:, 2:])  # the others attend as the model does
    assert not torch.equal(mixed[:, :2], own[:, :2])
    assert torch.equal(every_head, whole)
    assert not torch.allclose(partial, whole) and not torch.allclose(partial, model(ids).logits)


def test_a_gain_on_a_heads_one_source_scales_it_as_every_graph_does():
    from sa_export.accuracy.reference import mix_probs
    from sa_export.core.plan import HeadMap

    stored = {0: torch.softmax(torch.randn(1, 2, 3, 5), -1)}
    head_map = HeadMap((((0, 1),), ((0, 0),)), ((0.5,), (1.0,)))
    mixed = mix_probs(stored, head_map)
    assert torch.allclose(mixed[:, 0], 0.5 * stored[0][:, 1]) and torch.allclose(mixed[:, 1], stored[0][:, 0])
