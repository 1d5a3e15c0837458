import subprocess
import sys

import numpy as np
import pytest

from sa_export.core.errors import UsageError
from sa_export.runtime import SAModel, position_ids_from_mask
from tests.helpers import run_cli


def test_positions_skip_left_padding():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask, 5).tolist() == [[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert position_ids_from_mask(mask, 1).tolist() == [[2], [4]]


def test_cache_follows_the_manifest_layout(converted_tiny_llama):
    model = SAModel(converted_tiny_llama)
    cache = model.empty_cache(2)
    assert "past_key_values.3.key" not in cache and "past_key_values.3.value" in cache
    assert len(cache) == 10
    ids = np.array([[5, 6, 7]])
    logits, cache, _ = model.forward(ids, np.ones_like(ids), model.empty_cache(1))
    assert logits.shape == (1, 3, 256) and cache["past_key_values.0.key"].shape == (1, 2, 3, 16)


def test_runtime_and_generate_do_not_import_torch_or_transformers(converted_tiny_llama):
    code = (
        "import sys\n"
        "from sa_export.runtime import SAModel\n"
        f"text = ''.join(SAModel({str(converted_tiny_llama)!r}).generate('w3 w4', 3))\n"
        "assert text, 'nothing generated'\n"
        "bad = [m for m in ('torch', 'transformers', 'onnxscript') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_chat_prompt_renders_the_models_template(tmp_path):
    from sa_export.runtime import chat_prompt

    (tmp_path / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<s>"}')
    assert chat_prompt(tmp_path, "hi") == "<s><|user|>hi<|assistant|>"


def test_chat_without_a_template_exits_2(converted_tiny_llama):
    from tests.helpers import run_cli

    result = run_cli("generate", converted_tiny_llama, "--prompt", "w3", "--chat")
    assert result.exit_code == 2 and "no chat template" in result.stderr


def test_shared_buffer_cache_is_written_in_place(genai_tiny_llama):
    model = SAModel(genai_tiny_llama)
    assert model.shared_buffer
    cache = model.empty_cache(1, 8)
    assert "past_key_values.3.key" not in cache and cache["past_key_values.3.value"].shape == (1, 2, 8, 16)
    buffers = {name: id(array) for name, array in cache.items()}
    ids = np.array([[5, 6, 7, 8, 9]])
    mask = np.ones_like(ids)
    logits, cache, outputs = model.forward(ids, mask, cache)
    assert logits.shape == (1, 5, 256)
    assert {name: id(array) for name, array in cache.items()} == buffers  # the same buffers, filled
    for name in ("past_key_values.2.key", "past_key_values.3.value"):  # GQA's and the shared layer's own write
        assert np.abs(cache[name][:, :, :5]).sum() > 0 and not cache[name][:, :, 5:].any()
    assert outputs["present.3.value"].shape == (1, 2, 5, 16)
    step, cache, _ = model.forward(np.array([[10]]), np.ones((1, 6), np.int64), cache)
    assert np.abs(cache["past_key_values.3.value"][:, :, 5]).sum() > 0 and not cache["past_key_values.3.value"][:, :, 6:].any()


def test_shared_buffer_refuses_a_step_past_its_capacity(genai_tiny_llama):
    model = SAModel(genai_tiny_llama)
    with pytest.raises(UsageError, match="holds 4 positions"):
        model.forward(np.array([[5, 6, 7, 8, 9]]), np.ones((1, 5), np.int64), model.empty_cache(1, 4))
    with pytest.raises(UsageError, match="max_length 256"):
        model.empty_cache(1, 300)


def test_shared_buffer_refuses_a_non_contiguous_cache(genai_tiny_llama):
    """An OrtValue over a strided view would be a copy: the graph's in-place writes would be lost."""
    model = SAModel(genai_tiny_llama)
    cache = model.empty_cache(1, 16)
    cache["past_key_values.3.value"] = cache["past_key_values.3.value"][:, :, ::2]
    with pytest.raises(UsageError, match="C-contiguous"):
        model.forward(np.array([[5, 6, 7]]), np.ones((1, 3), np.int64), cache)


@pytest.mark.parametrize("which", ["converted_tiny_llama", "genai_tiny_llama"])
def test_chunked_prefill_gives_the_logits_of_one_call(which, request):
    from sa_export.runtime import SAModel

    model = SAModel(request.getfixturevalue(which))
    ids = np.random.default_rng(3).integers(3, 100, (1, 11))
    mask = np.ones_like(ids)
    whole, _, whole_out = model.prefill(ids, mask, model.empty_cache(1, 16), None)
    chunked, cache, chunked_out = model.prefill(ids, mask, model.empty_cache(1, 16), 4)
    assert chunked.shape == whole.shape == (1, 11, whole.shape[-1])
    np.testing.assert_allclose(chunked, whole, atol=1e-5)
    for name in whole_out:
        if name.startswith("present."):
            np.testing.assert_allclose(chunked_out[name], whole_out[name], atol=1e-5)
    # and decoding goes on from the chunked cache
    step, _, _ = model.forward(ids[:, -1:], np.ones((1, 12), np.int64), cache)
    assert step.shape == (1, 1, whole.shape[-1])
    # generation keeps only the last token's logits, chunked or not
    for chunk in (4, None):
        last, _, _ = model.prefill(ids, mask, model.empty_cache(1, 16), chunk, all_logits=False)
        assert last.shape == (1, 1, whole.shape[-1])
        np.testing.assert_allclose(last[0, 0], whole[0, -1], atol=1e-5)


def test_chunked_prefill_gives_freed_memory_back_after_each_chunk(genai_tiny_llama, monkeypatch):
    from sa_export.runtime import SAModel, base

    model = SAModel(genai_tiny_llama)
    released = []
    monkeypatch.setattr(base, "release_free_memory", lambda: released.append(True) or True)
    ids = np.random.default_rng(3).integers(3, 100, (1, 11))
    model.prefill(ids, np.ones_like(ids), model.empty_cache(1, 16), 4)
    assert len(released) == 3  # chunks of 4, 4 and 3 tokens


def test_check_with_chunked_prefill_passes(converted_tiny_llama):
    result = run_cli("check", converted_tiny_llama, "--prefill-chunk", "2", "--decode-steps", "4")
    assert result.exit_code == 0, result.output + result.stderr
