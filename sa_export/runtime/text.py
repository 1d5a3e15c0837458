"""Text in and out of any runtime backend: tokenizer, chat template, greedy generation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sa_export.core.errors import EnvironmentProblem, UsageError
from sa_export.runtime.base import DEFAULT_PREFILL_CHUNK


def load_tokenizer(out_dir: str | Path):
    path = Path(out_dir) / "tokenizer.json"
    if not path.is_file():
        raise UsageError(f"{out_dir} has no tokenizer.json (the source model had no tokenizer); generate needs one")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise EnvironmentProblem("generate needs the tokenizers package: pip install tokenizers") from None
    return Tokenizer.from_file(str(path))


def chat_prompt(out_dir: str | Path, user_message: str) -> str:
    """The model's own chat template applied to one user turn (instruct models expect it).

    Rendered with jinja2's sandbox, as transformers does, so that no PyTorch is needed.
    """
    import json

    out_dir = Path(out_dir)
    template_file = out_dir / "chat_template.jinja"
    config_file = out_dir / "tokenizer_config.json"
    template = template_file.read_text() if template_file.is_file() else None
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    template = template or config.get("chat_template")
    if not template:
        raise UsageError(f"{out_dir} has no chat template; drop --chat to use the prompt as plain text")
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise EnvironmentProblem("--chat needs jinja2: pip install jinja2") from None
    special = {k: (v if isinstance(v, str) else (v or {}).get("content")) for k, v in config.items() if k in ("bos_token", "eos_token")}
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return environment.from_string(template).render(
        messages=[{"role": "user", "content": user_message}], add_generation_prompt=True, **special
    )


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK) -> Iterator[str]:
    """Greedy generation with any model that has empty_cache/prefill/forward; the prompt goes in
    chunks of ``prefill_chunk`` tokens; yields text as it decodes cleanly."""
    prompt_ids = tokenizer.encode(prompt).ids
    if not prompt_ids:
        raise UsageError("the prompt is empty: give --prompt some text to continue")
    eos = set(model.manifest.eos_token_ids)
    input_ids = np.asarray([prompt_ids], dtype=np.int64)
    mask = np.ones_like(input_ids)
    cache = model.empty_cache(1, len(prompt_ids) + max_new_tokens)
    generated: list[int] = []
    # Decode prompt + generated together: word-boundary spaces live in different
    # places for different tokenizers, and only the whole sequence decodes them right.
    emitted = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    for index in range(max_new_tokens):
        if index == 0:
            logits, cache, _ = model.prefill(input_ids, mask, cache, prefill_chunk, all_logits=False)
        else:
            logits, cache, _ = model.forward(input_ids, mask, cache)
        token = int(np.argmax(logits[0, -1]))
        if token in eos:
            break
        generated.append(token)
        text = tokenizer.decode(prompt_ids + generated, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            yield text[len(emitted) :]
            emitted = text
        input_ids = np.asarray([[token]], dtype=np.int64)
        mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)


def stream_generation(
    out_dir: str | Path, prompt: str, max_new_tokens: int = 64, backend: str = "ort", chat: bool = False,
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK, memory: str = "arena",
) -> Iterator[str]:
    """`generate`: the prompt as given (or nothing, with the chat template), then the text as it decodes."""
    from sa_export.runtime import open_model

    model = open_model(out_dir, backend, memory)
    tokenizer = load_tokenizer(out_dir)  # fails before anything is printed when there is none
    if chat:
        prompt = chat_prompt(out_dir, prompt)
    else:
        yield prompt
    yield from generate_text(model, tokenizer, prompt, max_new_tokens, prefill_chunk)
