"""The manifest of a rewritten graph: what the graph holds and what produced it."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from graph_passes import GROUP_QUERY_ATTENTION, cache_layers, graph_family, writes_caches_in_place
from sa_export import __version__
from sa_export.core.cache_names import PAST_RE, present_name
from sa_export.core.errors import UsageError
from sa_export.core.manifest import CacheInfo, KVSavings, LayerCache, Manifest, ModelFacts, SourceInfo, artifact_hashes
from sa_export.core.plan import SharingPlan
from sa_export.hf.models import ModelSource, accepted_unknown_keys, saved_by_version, transformers_version

ONNX_DTYPES = {ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.INT64: "int64"}


def cache_layout(graph: ir.Graph, num_layers: int) -> tuple[LayerCache, ...]:
    inputs = cache_layers(graph)
    outputs = {v.name for v in graph.outputs}
    heads = {v.name: v.shape[1] for v in graph.inputs if v.shape is not None and len(v.shape) == 4}
    layout = []
    for layer in range(num_layers):
        names = inputs.get(layer, {})

        def present(kind: str) -> str | None:
            name = present_name(layer, kind)
            return name if kind in names and name in outputs else None

        key, value, borrowed = names.get("key"), names.get("value"), names.get("borrowed_value")
        # A K cache narrower than all the layer's V: a partly shared layer's, which keeps some
        # KV groups; on the GroupQueryAttention graph its V cache is split into the kept groups'
        # and the borrowed groups' (borrowed_value).
        all_values = (heads.get(value) or 0) + (heads.get(borrowed) or 0) if value is not None else None
        narrower = key is not None and value is not None and heads.get(key) != all_values
        split = (heads[value], borrowed, present("borrowed_value")) if borrowed is not None else (None, None, None)
        layout.append(LayerCache(layer, key, present("key"), value, present("value"), heads[key] if narrower else None, *split))
    return tuple(layout)


def cache_info(graph: ir.Graph, num_layers: int, capacity: int | None) -> CacheInfo:
    """KV heads, head dim and dtype from the first value-cache input; the buffer scheme from the graph:
    in-place buffers of ``capacity`` positions (GroupQueryAttention, or TensorScatter writes), else concatenation."""
    layout = cache_layout(graph, num_layers)
    first = next(layer.value_input for layer in layout if layer.value_input)
    value = next(v for v in graph.inputs if v.name == first)
    shape = value.shape
    if shape is None or len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
        raise UsageError(f"cache input {value.name} has shape {shape}; expected [batch, kv_heads, past, head_dim]")
    kv_heads, head_dim, dtype = shape[1], shape[3], ONNX_DTYPES.get(value.dtype, str(value.dtype))
    savings = KVSavings.of(list(layout), kv_heads, head_dim, dtype)
    if graph_family(graph) == GROUP_QUERY_ATTENTION or writes_caches_in_place(graph):
        # Bind each present to its past's buffer; the graph writes the new rows.
        return CacheInfo(kv_heads, head_dim, dtype, "[batch, num_kv_heads, max_length, head_dim]", "shared", savings, layout, capacity)
    return CacheInfo(kv_heads, head_dim, dtype, "[batch, num_kv_heads, past_sequence_length, head_dim]", "concat", savings, layout)


def _eos_ids(config) -> tuple[int, ...]:
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))


def source_info(source: ModelSource, config, reference: ModelSource | None, reference_name: str | None, accepted_keys: bool) -> SourceInfo:
    """The model, and for a Hugging Face reference the release that saved it and the keys accepted."""
    info = SourceInfo(source.name, source.kind, str(source.path), reference_name)
    if config is None:
        return info
    # Without the flag, load_config has already refused any unknown key: nothing to look up.
    accepted = tuple(accepted_unknown_keys(reference)) if accepted_keys and reference is not None else ()
    return SourceInfo(
        source.name, source.kind, str(source.path), reference_name,
        architecture=(config.architectures or [config.model_type])[0], model_type=config.model_type,
        saved_by_transformers=saved_by_version(reference) if reference is not None else None,
        accepted_unknown_config_keys=accepted,
    )


def describe(
    graph: ir.Graph, plan: SharingPlan, source: SourceInfo, config, files: list[str], out_dir: Path,
    precision: str, target: str, exporter: str, head_map: dict | None = None, capacity: int | None = None,
) -> Manifest:
    """The manifest of the graph saved in ``out_dir`` as ``files``; ``capacity``: the positions of an
    in-place cache buffer (default: the model's max positions)."""
    model = None
    if config is not None:
        model = ModelFacts(config.num_attention_heads, config.hidden_size, config.vocab_size, getattr(config, "max_position_embeddings", None))
    return Manifest(
        tool={"name": "sa-export", "version": __version__, "transformers": transformers_version()},
        source=source,
        num_layers=plan.num_layers,
        model=model,
        plan=plan,
        cache=cache_info(graph, plan.num_layers, capacity or (model.max_position_embeddings if model else None)),
        io={v.name: ONNX_DTYPES.get(v.dtype, str(v.dtype).lower()) for v in [*graph.inputs, *graph.outputs]},
        precision=precision,
        target=target,
        exporter=exporter,
        opset=graph.opset_imports.get("", None),
        eos_token_ids=_eos_ids(config) if config is not None else (),
        files=artifact_hashes(out_dir, files),
        head_map=head_map,
    )


def cache_precision(graph: ir.Graph) -> str:
    """fp32 or fp16: the precision of an ONNX input, read from its value cache."""
    value = next(v for v in graph.inputs if (match := PAST_RE.match(v.name or "")) and match.group(2) == "value")
    return ONNX_DTYPES.get(value.dtype, str(value.dtype)).replace("float", "fp")
