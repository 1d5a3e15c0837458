"""Evaluation and calibration text: where it comes from, and a guarantee that the two never overlap."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sa_export.core.errors import EnvironmentProblem, UsageError
from sa_export.core.resources import package_file

# English news text available offline: the Lee background corpus that the gensim wheel ships.
DEFAULT_TEXT = ("gensim", "test/test_data/lee_background.cor")
# Text of another domain, to check that what was fitted on news holds elsewhere: the
# Python source of torch.nn.Module (code and its docstrings), which the pinned torch ships.
OTHER_DOMAIN_TEXT = ("torch", "nn/modules/module.py")
# Text of a third domain, which no calibration or search here reads: encyclopedia articles
# in wiki markup, from the excerpt of an English Wikipedia dump that the gensim wheel ships.
UNSEEN_DOMAIN_TEXT = ("gensim", "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
# English prose of a third kind, for calibration only: the Python language reference's
# topics, which every Python ships for pydoc (pydoc_data.topics). It is neither news,
# code nor encyclopedia, so a fit that reads it is still judged on a domain it never saw.
DOCUMENTATION_MODULE = "pydoc_data.topics"
CALIB_TOKENS = 4096
LORA_CALIB_TOKENS = 16384  # corrections have thousands of numbers: 4x the text lowered their penalty on every domain (README, heal)
# Two texts overlap when they share any run of this many tokens.
OVERLAP_WINDOW = 32


def calib_tokens_for(calib_tokens: int | None, lora_rank: int = 0) -> int:
    """The calibration tokens asked for, else the default for the request (more with LoRA corrections)."""
    return calib_tokens or (LORA_CALIB_TOKENS if lora_rank else CALIB_TOKENS)


def calib_files_for(calib_file, lora_rank: int = 0, added=()):
    """The calibration files asked for, else the default for the request: the default text's
    tail (None), or with LoRA corrections the tails of two domains, news and Python source.
    A fit with corrections on both held better on a third domain, which it never read, than
    one on news alone (README, heal). ``added`` (--add-calib) come after those files, so a
    user's own text joins the default domains instead of replacing them."""
    if not calib_file and lora_rank:
        calib_file = (str(default_text_path()), str(other_domain_text_path()))
    if not added:
        return calib_file
    files = tuple(calib_file) if isinstance(calib_file, (list, tuple)) else (calib_file,)
    read = calib_paths(files)
    for file in added:
        if Path(file).resolve() in read:
            raise UsageError(f"--add-calib {file}: the calibration already reads it")
        read.append(Path(file).resolve())
    return tuple(str(path) for path in calib_paths(files)) + tuple(added)


def calib_paths(calib_file) -> list[Path]:
    """The resolved file of each calibration text (None: the default text)."""
    files = list(calib_file) if isinstance(calib_file, (list, tuple)) else [calib_file]
    return [Path(file).resolve() if file else default_text_path().resolve() for file in files]


def _packaged_text(what: str, location: tuple[str, str], option: str) -> Path:
    package, relative = location
    path = package_file(package, relative)
    if path is None:
        raise EnvironmentProblem(f"the {what} comes with {package}: pip install {package}, or pass {option} FILE")
    return path


def default_text_path() -> Path:
    return _packaged_text("default text", DEFAULT_TEXT, "--text/--calib")


def other_domain_text_path() -> Path:
    return _packaged_text("other-domain text", OTHER_DOMAIN_TEXT, "--other-text")


def other_domain_tokens(tokenizer, path: str | Path | None, max_tokens: int) -> TokenText:
    """The first ``max_tokens`` tokens of the other-domain text (default: torch.nn.Module's source).
    gensim's Wikipedia dump, named by its path, is read as ``default`` reads it: its articles."""
    if path is not None and _is_wiki_dump(Path(path)):
        return unseen_domain_tokens(tokenizer, None, max_tokens)
    text, file = read_text(path or other_domain_text_path())
    ids = tokenizer(text)["input_ids"][:max_tokens]
    return TokenText(ids, f"{file} tokens 0-{len(ids)}")


def other_domain_for(tokenizer, other_text, calibrated: list[Path], max_tokens: int) -> TokenText:
    """``other_text``, else torch.nn.Module's source, else (when that is a calibration text)
    the Wikipedia excerpt: a report's other domain is never one its calibration read."""
    if other_text is not None:
        return other_domain_tokens(tokenizer, other_text, max_tokens)
    if _default_reads_wiki(calibrated):
        return unseen_domain_tokens(tokenizer, None, max_tokens)
    return other_domain_tokens(tokenizer, None, max_tokens)


def other_domain_texts(tokenizer, other_texts, calibrated: list[Path], max_tokens: int) -> list[TokenText]:
    """Each of ``other_texts`` ("default": ``other_domain_for``'s choice), or that default
    alone when none is given; ``("none",)`` skips them. A text the calibration reads is
    refused: an other domain's figure is one of text no fit has seen."""
    texts = []
    for name in other_text_files(other_texts, calibrated):
        text = other_domain_for(tokenizer, name, calibrated, max_tokens)
        if len(text.ids) < 2:
            raise UsageError(f"--other-text {name or 'default'}: {len(text.ids)} tokens, too few to score; give a longer text")
        texts.append(text)
    return texts


def other_text_files(other_texts, calibrated: list[Path]) -> list[str | None]:
    """The files ``other_texts`` names (None: the default text), checked without reading
    them, so that a wrong path, a text named twice (``default`` included, as the file it
    stands for) or a calibration text fails before a model loads; [] for ``none``."""
    names = list(other_texts) or ["default"]
    if any(name.lower() == "none" for name in names):
        if len(names) > 1:
            raise UsageError("--other-text none skips the other domains; give it alone")
        return []
    # What default stands for: no file given by path is the Wikipedia excerpt, which is read as articles.
    default_file = "the Wikipedia excerpt" if _default_reads_wiki(calibrated) else other_domain_text_path().resolve()
    files, seen = [], set()
    for name in names:
        default = name.lower() == "default"
        if not default and not Path(name).is_file():
            raise UsageError(f"--other-text {name}: {'a directory, not a text file' if Path(name).is_dir() else 'text file not found'}; pass an existing file")
        key = default_file if default else Path(name).resolve()
        if key in seen:
            raise UsageError(f"--other-text {name} is given twice" + (" (default is that file)" if key == default_file else ""))
        if key in calibrated:
            raise UsageError(f"--other-text {name} is also a calibration text; give text of a domain the calibration never reads")
        seen.add(key)
        files.append(None if default else name)
    return files


def _default_reads_wiki(calibrated: list[Path]) -> bool:
    """Whether the default other text is the Wikipedia excerpt: torch.nn.Module's source is a calibration text."""
    return other_domain_text_path().resolve() in calibrated


def unseen_domain_tokens(tokenizer, path: str | Path | None, max_tokens: int) -> TokenText:
    """The first ``max_tokens`` tokens of a third domain's text: a plain file, or by default
    the articles of gensim's Wikipedia excerpt (redirects left out), one after another."""
    if path is not None:
        text, file = read_text(path)
    else:
        file = _packaged_text("unseen-domain text", UNSEEN_DOMAIN_TEXT, "--unseen-text")
        text = _wiki_articles(file, max_characters=max_tokens * 8)
    ids = tokenizer(text)["input_ids"][:max_tokens]
    return TokenText(ids, f"{file} tokens 0-{len(ids)}")


def unseen_domain_tail(tokenizer, path: str | Path | None, eval_tokens: int, max_tokens: int) -> TokenText:
    """``max_tokens`` tokens of the third domain's text that follow its evaluation head (the
    first ``eval_tokens``, as ``unseen_domain_tokens`` gives them), one evaluation's length
    apart; refused if they share a passage with that head."""
    skip = 2 * eval_tokens
    every = unseen_domain_tokens(tokenizer, path, skip + max_tokens).ids
    ids = every[skip:]
    if len(ids) < max_tokens:
        raise UsageError(f"the unseen-domain text has too few tokens for {max_tokens} calibration tokens after its evaluation head")
    if _share_a_window(every[:eval_tokens], ids):
        raise UsageError("the unseen-domain text's tail repeats a passage of its evaluation head")
    return TokenText(ids, f"unseen-domain text tokens {skip}-{skip + len(ids)}")


def documentation_tokens(tokenizer, max_tokens: int) -> TokenText:
    """The last ``max_tokens`` tokens of Python's reference topics (``DOCUMENTATION_MODULE``), topic after topic."""
    import importlib

    topics = importlib.import_module(DOCUMENTATION_MODULE).topics
    ids = tokenizer("\n\n".join(topics[name] for name in sorted(topics)))["input_ids"]
    start = max(0, len(ids) - max_tokens)
    return TokenText(ids[start:], f"{DOCUMENTATION_MODULE} tokens {start}-{len(ids)}")


def sampled_tokens(model, max_tokens: int, sequence_tokens: int = 256, batch: int = 16, seed: int = 0) -> TokenText:
    """``max_tokens`` tokens the model writes itself: sequences of ``sequence_tokens``, each
    sampled (nucleus 0.95) from the start of a document (token 0, the pretraining separator
    of Llama-family tokenizers like SmolLM2's). Text of no one domain, as diverse as the
    model's own distribution, and read by no evaluation here."""
    import torch

    start = torch.zeros((batch, 1), dtype=torch.long, device=model.device)
    sequences = []
    # transformers samples from torch's global generators: seed them, and give the caller's back after
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        torch.manual_seed(seed)
        while len(sequences) * sequence_tokens < max_tokens:
            out = model.generate(
                input_ids=start, attention_mask=torch.ones_like(start), do_sample=True, top_p=0.95, top_k=0, temperature=1.0,
                max_new_tokens=sequence_tokens - 1, min_new_tokens=sequence_tokens - 1, pad_token_id=0,
            )
            sequences.extend(out.tolist())
    ids = [token for sequence in sequences for token in sequence][:max_tokens]
    return TokenText(ids, f"sampled from the model (seed {seed}), {len(ids)} tokens")


def repeated_tokens(source: list[int], max_tokens: int, chunk_tokens: int = 256, seed: int = 0) -> TokenText:
    """``max_tokens`` tokens of ``source`` rearranged so that every chunk of ``chunk_tokens``
    (the fit's chunks) copies itself: its first half is the next run of ``source``, its second
    half spans of 4 to 16 tokens taken verbatim from the first half. Text of ``source``'s
    domains (the first halves spread over all of it) whose second halves a model predicts by
    copying, as it predicts the phrases a licence or an article repeats."""
    import random

    rng, ids, half = random.Random(seed), [], chunk_tokens // 2
    chunks = max(1, max_tokens // chunk_tokens)
    stride = max(half, (len(source) - half) // chunks)  # first halves from all of ``source``: each of its texts
    for offset in range(0, len(source) - half + 1, stride)[:chunks]:
        first = source[offset : offset + half]
        copied = []
        while len(copied) < chunk_tokens - half:
            length = rng.randint(4, 16)
            start = rng.randrange(0, half - length)
            copied.extend(first[start : start + length])
        ids.extend(first + copied[: chunk_tokens - half])
    return TokenText(ids[:max_tokens], f"{len(ids[:max_tokens])} tokens of the calibration texts, each chunk's second half copied from its first")


def _wiki_articles(dump: Path, max_characters: int) -> str:
    import bz2
    import xml.etree.ElementTree as ElementTree  # the dump is a file of the installed gensim wheel

    articles, size = [], 0
    with bz2.open(dump) as stream:
        for _, element in ElementTree.iterparse(stream):
            if element.tag.endswith("}text") and element.text and not element.text.lstrip().upper().startswith("#REDIRECT"):
                articles.append(element.text)
                size += len(element.text)
                if size >= max_characters:
                    break
            element.clear()
    return "\n\n".join(articles)


def _is_wiki_dump(file: Path) -> bool:
    location = package_file(*UNSEEN_DOMAIN_TEXT)
    return location is not None and file.is_file() and file.resolve() == location.resolve()


# Magic numbers of the compressed and binary files a text path may name by mistake.
_NOT_TEXT = {b"BZh": "bzip2-compressed", b"\x1f\x8b": "gzip-compressed", b"\xfd7zXZ": "xz-compressed", b"PK\x03\x04": "a zip archive"}


def read_text(path: str | Path | None) -> tuple[str, Path]:
    file = Path(path) if path else default_text_path()
    if not file.is_file():
        raise UsageError(f"text file {file} {'is a directory' if file.is_dir() else 'not found'}; pass an existing file")
    data = file.read_bytes()
    kind = next((what for magic, what in _NOT_TEXT.items() if data.startswith(magic)), "binary" if b"\x00" in data[:65536] else None)
    if kind is not None:  # read as text it would score as garbage, and no figure would say so
        raise UsageError(f"{file} is {kind}, not text; decompress it or pass a text file")
    text = data.decode("utf-8", errors="replace")
    if not text.strip():
        raise UsageError(f"text file {file} is empty")
    return text, file.resolve()


@dataclasses.dataclass(frozen=True)
class TokenText:
    ids: list[int]
    source: str  # file and token range, for reports

    @property
    def file(self) -> str:
        """The source without its token range."""
        return self.source.rsplit(" tokens ", 1)[0]

    def to_json(self) -> dict:
        return {"source": self.source, "tokens": len(self.ids)}


def split_texts(tokenizer, eval_file, calib_file, eval_tokens: int, calib_tokens: int) -> tuple[TokenText, TokenText]:
    """Evaluation tokens from the head of their file, calibration tokens from the tail of theirs.

    ``calib_file`` may be several files (a tuple): ``calib_tokens`` from the tail of each,
    one after another, so that a fit sees every domain the user names.
    When calibration and evaluation come from one file the ranges are disjoint by
    construction; in every case they are checked for shared runs of OVERLAP_WINDOW
    tokens, and an overlap is refused.
    """
    eval_text, eval_path = read_text(eval_file)
    eval_all = tokenizer(eval_text)["input_ids"]
    eval_ids = eval_all[:eval_tokens]
    evaluation = TokenText(eval_ids, f"{eval_path} tokens 0-{len(eval_ids)}")
    files = list(calib_file) if isinstance(calib_file, (list, tuple)) else [calib_file]
    parts = [_calibration_tail(tokenizer, file, eval_path, eval_all, evaluation, calib_tokens) for file in files or [None]]
    calibration = TokenText([i for part in parts for i in part.ids], " + ".join(part.source for part in parts))
    return evaluation, calibration


def _calibration_tail(tokenizer, calib_file, eval_path: Path, eval_all: list[int], evaluation: TokenText, calib_tokens: int) -> TokenText:
    calib_text, calib_path = read_text(calib_file)
    calib_all = eval_all if calib_path == eval_path else tokenizer(calib_text)["input_ids"]
    if calib_path == eval_path:
        available = len(calib_all) - len(evaluation.ids)
        if available < min(calib_tokens, 512):
            raise UsageError(
                f"{eval_path} has {len(calib_all)} tokens: too few to hold {len(evaluation.ids)} evaluation and "
                f"{calib_tokens} calibration tokens apart; pass a separate --calib FILE"
            )
        start = len(calib_all) - min(calib_tokens, available)
    else:
        start = max(0, len(calib_all) - calib_tokens)
    calib_ids = calib_all[start:]
    calibration = TokenText(calib_ids, f"{calib_path} tokens {start}-{start + len(calib_ids)}")
    if _share_a_window(evaluation.ids, calib_ids):
        raise UsageError(
            f"calibration text ({calibration.source}) and evaluation text ({evaluation.source}) overlap; "
            "pass texts that share no passage"
        )
    return calibration


def _share_a_window(a: list[int], b: list[int]) -> bool:
    if len(a) < OVERLAP_WINDOW or len(b) < OVERLAP_WINDOW:
        return False
    windows = {tuple(a[i : i + OVERLAP_WINDOW]) for i in range(len(a) - OVERLAP_WINDOW + 1)}
    return any(tuple(b[i : i + OVERLAP_WINDOW]) in windows for i in range(len(b) - OVERLAP_WINDOW + 1))
