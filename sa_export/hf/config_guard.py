"""Refuse a config.json whose keys the installed transformers would silently ignore.

A config saved by a newer transformers release can carry settings that the installed
release does not know. transformers keeps such keys as plain attributes and builds the
model without them: a model other than the one the user has, which export and the
PyTorch reference would then agree on. transformers offers no list of the keys a model
honours, so this asks it in three ways:

* build the config class from the raw dict: keys it defines are dataclass fields, keys
  it migrates from older releases (``rope_theta``, ``rope_scaling``, ``torch_dtype``) are
  consumed, and ``attribute_map`` aliases are redirected; only what is left is stored
  verbatim;
* a key the config or modeling source reads optionally (``kwargs.get("x")``,
  ``getattr(config, "x", ...)``, as Qwen2 reads ``head_dim``) is honoured though undeclared;
* keys read by the library outside the config class, generation defaults, and a few
  known-inert tags of older files (below) are accepted.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
import inspect
import re

# Read outside the config class: AutoConfig, from_pretrained (quantization), pipelines.
_LIBRARY_KEYS = frozenset(
    {"model_type", "auto_map", "quantization_config", "transformers_weights", "fusion_config", "custom_pipelines",
     "gradient_checkpointing", "_name_or_path"}
)
# Keys older releases or training tools wrote that change nothing, with the value at which they are inert
# (None: any value). Seen in real checkpoints: SmolLM2 (nanotron tags), Phi-3, Gemma 2, GPT-2, and in
# what transformers' own GGUF loader writes (a display name, the tokenizer's unknown-token id).
_INERT_KEYS = {
    "_model_name_or_path": None,
    "unk_token_id": None,
    "is_llama_config": None,
    "rope_interleaved": False,
    "attention_bias": False,
    "task_specific_params": None,
}
# Inert when equal to the value the model uses under another name.
_ALIASED_KEYS = {"hidden_act": "hidden_activation", "n_ctx": "n_positions"}

_KWARG_READ = re.compile(r"""kwargs\.(?:get|pop)\(\s*["'](\w+)["']""")
_OPTIONAL_READ = re.compile(r"""(?:getattr|hasattr)\(\s*(?:self\.)?config\s*,\s*["'](\w+)["']""")


@functools.cache
def _keys_read_by_source(cls) -> frozenset[str]:
    from transformers import GenerationConfig, PreTrainedConfig

    keys = set(vars(GenerationConfig()))  # GenerationConfig.from_model_config takes these from the config
    for klass in cls.__mro__:
        if issubclass(klass, PreTrainedConfig) and klass is not PreTrainedConfig:
            keys |= set(_KWARG_READ.findall(inspect.getsource(klass)))
    spec = importlib.util.find_spec(cls.__module__.replace(".configuration_", ".modeling_"))
    if spec is not None and spec.origin:
        with open(spec.origin, encoding="utf-8") as handle:
            keys |= set(_OPTIONAL_READ.findall(handle.read()))
    return frozenset(keys)


def _inert(key: str, raw: dict, config) -> bool:
    if key in _INERT_KEYS:
        return _INERT_KEYS[key] is None or raw[key] == _INERT_KEYS[key]
    other = _ALIASED_KEYS.get(key)
    return other is not None and getattr(config, other, object()) == raw[key]


def unknown_config_keys(raw: dict) -> list[str]:
    """Keys of ``raw`` (a config.json dict) that the installed transformers would ignore."""
    from transformers import CONFIG_MAPPING
    from transformers.utils import logging as hf_logging

    cls = CONFIG_MAPPING[raw["model_type"]]
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        config, default = cls.from_dict(copy.deepcopy(raw)), cls()
    finally:
        hf_logging.set_verbosity(level)
    stored_verbatim = set(vars(config)) - {f.name for f in dataclasses.fields(cls)} - set(vars(default))
    rope = getattr(config, "rope_parameters", None) or {}
    rope_dicts = [v for v in rope.values() if isinstance(v, dict)] or [rope]
    known = _LIBRARY_KEYS | _keys_read_by_source(cls)
    return sorted(
        key
        for key in raw
        if key in stored_verbatim
        and key not in known
        and not _inert(key, raw, config)
        # an old file's copy of a value transformers did take (gpt_neox: rope_theta beside rotary_emb_base)
        and not any(key in d and d[key] == raw[key] for d in rope_dicts)
    )
