import numpy as np
import pytest

from sa_export.core.errors import UsageError
from sa_export.accuracy.texts import split_texts
from tests.conftest import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(256)


def _random_words(n, seed=0):
    return np.random.default_rng(seed).integers(3, 253, n).tolist()


def _write(path, words):
    path.write_text(" ".join(f"w{w}" for w in words))
    return path


def test_one_file_gives_disjoint_head_and_tail(tokenizer, tmp_path):
    text = _write(tmp_path / "t.txt", _random_words(3000))
    evaluation, calibration = split_texts(tokenizer, text, text, 1000, 1000)
    assert len(evaluation.ids) == 1000 and len(calibration.ids) == 1000
    assert "tokens 0-1000" in evaluation.source and "tokens 2000-3000" in calibration.source


def test_overlapping_files_are_refused(tokenizer, tmp_path):
    words = _random_words(2000)
    a = _write(tmp_path / "a.txt", words)
    b = _write(tmp_path / "b.txt", words[500:1500])
    with pytest.raises(UsageError, match="overlap"):
        split_texts(tokenizer, a, b, 2000, 1000)


def test_several_calibration_files_give_the_tail_of_each(tokenizer, tmp_path):
    text = _write(tmp_path / "t.txt", _random_words(3000))
    other = _write(tmp_path / "o.txt", _random_words(1500, seed=1))
    evaluation, calibration = split_texts(tokenizer, text, (text, other), 1000, 1000)
    _, alone = split_texts(tokenizer, text, other, 1000, 1000)
    assert len(calibration.ids) == 2000 and calibration.ids[1000:] == alone.ids
    assert "t.txt tokens 2000-3000 + " in calibration.source and "o.txt tokens 500-1500" in calibration.source
    overlapping = _write(tmp_path / "x.txt", _random_words(3000)[:600])
    with pytest.raises(UsageError, match="overlap"):
        split_texts(tokenizer, text, (other, overlapping), 1000, 1000)


def test_too_short_a_single_file_is_refused(tokenizer, tmp_path):
    text = _write(tmp_path / "t.txt", range(3, 203))
    with pytest.raises(UsageError, match="too few"):
        split_texts(tokenizer, text, text, 150, 1000)


def test_the_unseen_domain_is_wikipedia_articles_without_redirects(tokenizer):
    from sa_export.accuracy.texts import UNSEEN_DOMAIN_TEXT, _wiki_articles
    from sa_export.core.resources import package_file

    articles = _wiki_articles(package_file(*UNSEEN_DOMAIN_TEXT), max_characters=20_000)
    assert len(articles) >= 20_000 and "'''Anarchism''' is a [[political philosophy]]" in articles
    assert "#REDIRECT" not in articles.upper() and "<page>" not in articles


def test_an_unseen_domain_file_is_read_as_it_is(tokenizer, tmp_path):
    from sa_export.accuracy.texts import unseen_domain_tokens

    text = tmp_path / "third.txt"
    text.write_text("verses of another kind " * 200)
    tokens = unseen_domain_tokens(tokenizer, text, 50)
    assert len(tokens.ids) == 50 and tokens.source.endswith("third.txt tokens 0-50")


def test_the_unseen_domains_tail_follows_its_evaluation_head_and_never_repeats_it(tokenizer, tmp_path):
    from sa_export.accuracy.texts import unseen_domain_tail, unseen_domain_tokens

    text = _write(tmp_path / "third.txt", _random_words(3000))
    tail = unseen_domain_tail(tokenizer, text, 500, 1000)
    assert tail.ids == unseen_domain_tokens(tokenizer, text, 2000).ids[1000:] and "tokens 1000-2000" in tail.source
    with pytest.raises(UsageError, match="too few"):
        unseen_domain_tail(tokenizer, text, 500, 5000)
    repeated = _write(tmp_path / "repeated.txt", _random_words(600) * 5)
    with pytest.raises(UsageError, match="repeats a passage"):
        unseen_domain_tail(tokenizer, repeated, 500, 1000)


def test_documentation_prose_is_the_tail_of_pythons_reference_topics():
    import pydoc_data.topics

    from sa_export.accuracy.texts import documentation_tokens

    def by_words(text):  # one "token" per word, so the tail can be read back
        return {"input_ids": text.split()}

    tokens = documentation_tokens(by_words, 40)
    total = sum(len(text.split()) for text in pydoc_data.topics.topics.values())
    last = pydoc_data.topics.topics[max(pydoc_data.topics.topics)].split()
    assert tokens.ids == last[-40:] and tokens.source == f"pydoc_data.topics tokens {total - 40}-{total}"


def test_sampled_text_is_the_models_own_documents_and_leaves_the_generator_alone(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM

    from sa_export.accuracy.texts import sampled_tokens

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    torch.manual_seed(7)
    state = torch.random.get_rng_state()
    text = sampled_tokens(model, 40, sequence_tokens=8, batch=2, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's generator is where it was
    assert len(text.ids) == 40 and text.ids[::8] == [0] * 5  # each sequence starts a document
    assert len(set(text.ids)) > 10  # sampled, not one greedy loop
    assert sampled_tokens(model, 40, sequence_tokens=8, batch=2, seed=3).ids == text.ids
    assert sampled_tokens(model, 40, sequence_tokens=8, batch=2, seed=4).ids != text.ids


def test_a_fit_with_corrections_calibrates_on_news_and_code_unless_told():
    from sa_export.accuracy.texts import calib_files_for, default_text_path, other_domain_text_path

    assert calib_files_for(None, lora_rank=0) is None  # the default text's tail
    assert calib_files_for(None, lora_rank=8) == (str(default_text_path()), str(other_domain_text_path()))
    assert calib_files_for(("mine.txt",), lora_rank=8) == ("mine.txt",)


def test_added_calibration_texts_follow_the_default_ones(tmp_path):
    from sa_export.accuracy.texts import calib_files_for, default_text_path, other_domain_text_path

    news, code = str(default_text_path().resolve()), str(other_domain_text_path().resolve())
    mine = str(tmp_path / "mine.txt")
    assert calib_files_for(None, lora_rank=0, added=(mine,)) == (news, mine)
    assert calib_files_for(None, lora_rank=8, added=(mine,)) == (news, code, mine)
    assert calib_files_for((code,), lora_rank=8, added=(mine,)) == (code, mine)  # --calib replaces, --add-calib adds
    with pytest.raises(UsageError, match="already reads"):
        calib_files_for(None, lora_rank=8, added=(code,))
    with pytest.raises(UsageError, match="already reads"):
        calib_files_for(None, lora_rank=0, added=(mine, mine))


def test_the_other_domain_is_never_one_the_calibration_read(tokenizer, tmp_path):
    from sa_export.accuracy.texts import default_text_path, other_domain_for, other_domain_text_path

    code = other_domain_text_path().resolve()
    assert str(code) in other_domain_for(tokenizer, None, [default_text_path().resolve()], 64).source
    wiki = other_domain_for(tokenizer, None, [default_text_path().resolve(), code], 64)
    assert "enwiki" in wiki.source and len(wiki.ids) == 64
    mine = tmp_path / "mine.txt"
    mine.write_text("a text of the user's own " * 20)
    assert str(mine.resolve()) in other_domain_for(tokenizer, mine, [code], 64).source  # asked for: as it is


def test_compressed_and_binary_files_are_refused_not_scored_as_text(tmp_path):
    import bz2
    import gzip

    from sa_export.accuracy.texts import read_text

    (tmp_path / "a.bz2").write_bytes(bz2.compress(b"some words " * 100))
    (tmp_path / "a.gz").write_bytes(gzip.compress(b"some words " * 100))
    (tmp_path / "a.bin").write_bytes(b"words\x00\x01\x02" * 100)
    for name, kind in (("a.bz2", "bzip2-compressed"), ("a.gz", "gzip-compressed"), ("a.bin", "binary")):
        with pytest.raises(UsageError, match=f"is {kind}, not text"):
            read_text(tmp_path / name)
    assert read_text(_write(tmp_path / "a.txt", [5, 6]))[0] == "w5 w6"


def test_the_wikipedia_dump_named_by_its_path_reads_as_its_articles(tokenizer):
    from sa_export.accuracy.texts import UNSEEN_DOMAIN_TEXT, other_domain_tokens, unseen_domain_tokens
    from sa_export.core.resources import package_file

    named = other_domain_tokens(tokenizer, package_file(*UNSEEN_DOMAIN_TEXT), 500)
    assert named == unseen_domain_tokens(tokenizer, None, 500) and len(named.ids) == 500


def test_repeated_text_copies_each_chunks_first_half_into_its_second():
    from sa_export.accuracy.texts import repeated_tokens

    source = list(range(100_000, 132_768))  # two texts of 16,384 tokens, every token distinct
    ids = repeated_tokens(source, 4096).ids
    assert len(ids) == 4096
    chunks = [ids[i : i + 256] for i in range(0, 4096, 256)]
    firsts = [chunk[:128] for chunk in chunks]
    assert all(first == source[first[0] - 100_000 :][:128] for first in firsts)  # runs of the source as they are
    assert firsts[0][0] == source[0] and firsts[-1][0] - 100_000 > len(source) // 2  # from both texts
    for chunk in chunks:
        second, position = chunk[128:], {token: i for i, token in enumerate(chunk[:128])}
        assert all(token in position for token in second)  # every token copied from the first half
        runs = [i for i in range(1, 128) if position[second[i]] != position[second[i - 1]] + 1]
        assert len(runs) < 128 // 4  # in spans of at least 4
