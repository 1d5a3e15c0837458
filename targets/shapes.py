"""Optimization profiles as data: min/opt/max shapes for every input the graph still has.

Two profiles, as an LLM runs in two regimes:
  prefill  many query tokens, no past;
  decode   one query token, a past of up to max_context - 1 tokens.
The shapes come from the manifest's cache layout, so K-cache inputs that SA removed
never appear. Only this data is needed by the trtexec script and the Python builder.
"""

from __future__ import annotations

import dataclasses

from sa_export.core.manifest import Manifest

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ShapeRange:
    min: Shape
    opt: Shape
    max: Shape


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    shapes: dict[str, ShapeRange]


def profiles_for(manifest: Manifest, max_batch: int, max_context: int, max_prefill: int) -> list[Profile]:
    head_dim = manifest.cache.head_dim
    past_inputs = [past for layer in manifest.layout for past, _ in layer.pairs()]
    token_inputs = [n for n in ("input_ids", "position_ids") if n in manifest.io]
    opt_batch = 1
    prefill_opt = min(128, max_prefill)
    prefill = {n: ShapeRange((1, 1), (opt_batch, prefill_opt), (max_batch, max_prefill)) for n in token_inputs}
    prefill["attention_mask"] = ShapeRange((1, 1), (opt_batch, prefill_opt), (max_batch, max_prefill))
    decode_opt = max_context // 2
    decode = {n: ShapeRange((1, 1), (opt_batch, 1), (max_batch, 1)) for n in token_inputs}
    decode["attention_mask"] = ShapeRange((1, 2), (opt_batch, decode_opt + 1), (max_batch, max_context))
    if manifest.cache.buffer == "shared":
        # In-place buffers hold the capacity in every step; the mask says how much is filled.
        capacity = manifest.cache.max_length or max_context
        for name in past_inputs:
            kv = manifest.cache.kv_heads_of(name)
            prefill[name] = decode[name] = ShapeRange((1, kv, capacity, head_dim), (opt_batch, kv, capacity, head_dim), (max_batch, kv, capacity, head_dim))
        return [Profile("prefill", prefill), Profile("decode", decode)]
    for name in past_inputs:
        kv = manifest.cache.kv_heads_of(name)  # a partly shared layer's K cache keeps fewer
        prefill[name] = ShapeRange((1, kv, 0, head_dim), (opt_batch, kv, 0, head_dim), (max_batch, kv, 0, head_dim))
        decode[name] = ShapeRange((1, kv, 1, head_dim), (opt_batch, kv, decode_opt, head_dim), (max_batch, kv, max_context - 1, head_dim))
    return [Profile("prefill", prefill), Profile("decode", decode)]


def profile_to_json(profile: Profile) -> dict:
    return {"name": profile.name, "shapes": {k: dataclasses.asdict(v) for k, v in profile.shapes.items()}}


def profile_from_json(data: dict) -> Profile:
    return Profile(data["name"], {k: ShapeRange(tuple(v["min"]), tuple(v["opt"]), tuple(v["max"])) for k, v in data["shapes"].items()})


def covering_profile(profiles: list[Profile]) -> Profile:
    """One profile whose ranges cover all given ones (for tools that take a single profile)."""
    names = profiles[0].shapes.keys()
    merged = {}
    for name in names:
        ranges = [p.shapes[name] for p in profiles]
        low = tuple(min(dims) for dims in zip(*(r.min for r in ranges)))
        high = tuple(max(dims) for dims in zip(*(r.max for r in ranges)))
        opt = profiles[-1].shapes[name].opt  # decode: the regime that runs most often
        merged[name] = ShapeRange(low, opt, high)
    return Profile("all", merged)
