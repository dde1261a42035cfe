"""RULER-style synthetic long-context tasks, generated locally in the model's own tokens.

Every case is built directly as token ids: a prompt head (chat template or plain), a context of
haystack tokens with the task's pieces (needles, facts, assignments) inserted at sentence
boundaries, and a tail (question and answer prefix). The total is exactly ``length`` tokens of the
given tokenizer. Cases are reproducible: each draws from ``random.Random`` seeded by the suite seed
and the case's coordinates (task, length, depth, sample).

Tasks (``TASKS``):

* ``niah_single``: one key/number needle at the requested depth.
* ``niah_multikey``: four needles with different keys; the queried one at the depth.
* ``niah_multivalue``: four numbers for one key (the first at the depth); all are asked for.
* ``niah_multiquery``: four needles, two of them queried (the first at the depth).
* ``variable_tracking``: a chain ``VAR A = 12345``, ``VAR B = VAR A``, ...; starts at the depth,
  later hops spread evenly towards the end; all names of the chain are asked for.
* ``common_words``: a numbered word list (no haystack, no depth); the ten words repeated most often
  are asked for.
* ``qa_retrieval``: short fictional facts ("the oldest bakery in Velmora is run by ...") among
  distractor facts of the same form; a question whose answer is a person's name.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from .haystack import Haystack, encode, essay_words, load_haystack, tokenizer_key

CONTEXT_MARK = "<<FLASHPREFILL_CONTEXT>>"

_NIAH_INSTRUCTION = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about the numbers afterwards."
)
_FIRST_NAMES = (
    "Alvin", "Beatrix", "Cedric", "Delia", "Emmett", "Fiona", "Gideon", "Harriet", "Ivo", "Juniper",
    "Kasimir", "Lorna", "Magnus", "Nadia", "Oswin", "Priya", "Quentin", "Rosalind", "Silas", "Tamsin",
)
_LAST_NAMES = (
    "Ashdown", "Brackwell", "Cordray", "Dunmore", "Elsworth", "Fenwick", "Galloway", "Hartigan",
    "Ingleby", "Jessop", "Kilbride", "Lockhart", "Merriman", "Norcott", "Oakhurst", "Pennington",
)
_SYLLABLES = ("vel", "mor", "bri", "tan", "kes", "dor", "lin", "ost", "ra", "hil", "wen", "zar", "qui", "fen", "ul")
_QA_FACTS = (
    ("The annual lantern festival of {place} was founded by {name}.",
     "Who founded the annual lantern festival of {place}?"),
    ("The first bridge across the river in {place} was designed by {name}.",
     "Who designed the first bridge across the river in {place}?"),
    ("The oldest bakery in {place} is run by {name}.", "Who runs the oldest bakery in {place}?"),
)


@dataclass(frozen=True)
class Piece:
    """Text inserted into the haystack at relative depth ``depth`` (0 = start of the context, 1 = end)."""

    depth: float
    text: str


@dataclass(frozen=True)
class TaskContent:
    """What a generator returns: the prompt parts, the pieces to insert (or a ready context) and answers."""

    instruction: str
    question: str
    answer_prefix: str
    answers: tuple[str, ...]
    pieces: tuple[Piece, ...] = ()
    # tasks that are not a haystack (common_words) build their context from the token budget
    build_context: Callable[[int], list[int]] | None = None


@dataclass(frozen=True)
class TaskSpec:
    """One task of the suite."""

    name: str
    generate: Callable[..., TaskContent]
    metric: str  # "all" (fraction of answers found) or "any" (1 if one answer is found)
    max_new_tokens: int
    uses_depth: bool = True
    description: str = field(default="", compare=False)


def _key(rng: random.Random, words: Sequence[str], taken: set[str]) -> str:
    while True:
        key = f"{rng.choice(words)}-{rng.choice(words)}"
        if key not in taken:
            taken.add(key)
            return key


def _number(rng: random.Random, taken: set[str], digits: int = 7) -> str:
    while True:
        value = str(rng.randrange(10 ** (digits - 1), 10**digits))
        if value not in taken:
            taken.add(value)
            return value


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def gen_niah_single(rng, depth, words, tokenizer) -> TaskContent:
    key, value = _key(rng, words, set()), _number(rng, set())
    return TaskContent(
        instruction=_NIAH_INSTRUCTION,
        question=f"What is the special magic number for {key} mentioned in the provided text?",
        answer_prefix=f"The special magic number for {key} mentioned in the provided text is",
        answers=(value,),
        pieces=(Piece(depth, _needle(key, value)),),
    )


def gen_niah_multikey(rng, depth, words, tokenizer, num_needles: int = 4) -> TaskContent:
    keys, values = set(), set()
    pairs = [(_key(rng, words, keys), _number(rng, values)) for _ in range(num_needles)]
    depths = [depth] + [rng.random() for _ in range(num_needles - 1)]
    key, value = pairs[0]
    return TaskContent(
        instruction=_NIAH_INSTRUCTION,
        question=f"What is the special magic number for {key} mentioned in the provided text?",
        answer_prefix=f"The special magic number for {key} mentioned in the provided text is",
        answers=(value,),
        pieces=tuple(Piece(d, _needle(k, v)) for d, (k, v) in zip(depths, pairs, strict=True)),
    )


def gen_niah_multivalue(rng, depth, words, tokenizer, num_values: int = 4) -> TaskContent:
    key, taken = _key(rng, words, set()), set()
    values = [_number(rng, taken) for _ in range(num_values)]
    depths = [depth] + [rng.random() for _ in range(num_values - 1)]
    return TaskContent(
        instruction=_NIAH_INSTRUCTION,
        question=f"What are all the special magic numbers for {key} mentioned in the provided text?",
        answer_prefix=f"The special magic numbers for {key} mentioned in the provided text are",
        answers=tuple(values),
        pieces=tuple(Piece(d, _needle(key, v)) for d, v in zip(depths, values, strict=True)),
    )


def gen_niah_multiquery(rng, depth, words, tokenizer, num_needles: int = 4, num_queries: int = 2) -> TaskContent:
    keys, values = set(), set()
    pairs = [(_key(rng, words, keys), _number(rng, values)) for _ in range(num_needles)]
    depths = [depth] + [rng.random() for _ in range(num_needles - 1)]
    asked = pairs[:num_queries]
    names = ", ".join(k for k, _ in asked[:-1]) + f" and {asked[-1][0]}" if num_queries > 1 else asked[0][0]
    return TaskContent(
        instruction=_NIAH_INSTRUCTION,
        question=f"What are all the special magic numbers for {names} mentioned in the provided text?",
        answer_prefix=f"The special magic numbers for {names} mentioned in the provided text are",
        answers=tuple(v for _, v in asked),
        pieces=tuple(Piece(d, _needle(k, v)) for d, (k, v) in zip(depths, pairs, strict=True)),
    )


def gen_variable_tracking(rng, depth, words, tokenizer, num_hops: int = 4) -> TaskContent:
    names: list[str] = []
    while len(names) < num_hops + 1:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    value = _number(rng, set(), digits=5)
    statements = [f"VAR {names[0]} = {value}."]
    statements += [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:], strict=False)]
    # the chain starts at the depth and its later hops are spread evenly towards the end, in order
    depths = [depth + (1.0 - depth) * i / (num_hops + 1) for i in range(num_hops + 1)]
    return TaskContent(
        instruction="Memorize and track the chain(s) of variable assignment hidden in the following text.",
        question=f"Question: Find all variables that are assigned the value {value} in the text above.",
        answer_prefix=(
            f"Answer: According to the chain(s) of variable assignment in the text above, {num_hops + 1} variables "
            f"are assigned the value {value}, they are:"
        ),
        answers=tuple(names),
        pieces=tuple(Piece(d, s) for d, s in zip(depths, statements, strict=True)),
    )


def gen_common_words(rng, depth, words, tokenizer, num_common: int = 10) -> TaskContent:
    picked = rng.sample(list(words), min(len(words), 4000))
    common, pool = picked[:num_common], picked[num_common:]

    def build(budget: int) -> list[int]:
        # ids are concatenated per item ("\n12." + " word"), so lengths add up exactly
        freq = max(3, budget // 250)
        word_ids = {w: encode(tokenizer, f" {w}") for w in picked}
        items = [w for w in common for _ in range(freq)]
        used = sum(len(word_ids[w]) for w in items)
        number_ids: list[list[int]] = []

        def numbers_len(n: int) -> int:
            while len(number_ids) < n:
                number_ids.append(encode(tokenizer, f"\n{len(number_ids) + 1}."))
            return sum(len(x) for x in number_ids[:n])

        if numbers_len(len(items)) + used > budget:
            raise ValueError(f"common_words needs more than {budget} context tokens for {num_common} words x {freq}")
        for w in pool:  # uncommon words appear once each
            extra = len(word_ids[w]) + numbers_len(len(items) + 1) - numbers_len(len(items))
            if numbers_len(len(items)) + used + extra > budget:
                break
            items.append(w)
            used += len(word_ids[w])
        rng.shuffle(items)
        ids = [t for i, w in enumerate(items) for t in number_ids[i] + word_ids[w]]
        newline = encode(tokenizer, "\n")
        return ids + newline * ((budget - len(ids)) // len(newline)) + ids[: (budget - len(ids)) % len(newline)]

    return TaskContent(
        instruction=(
            "Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often."
        ),
        question=f"Question: What are the {num_common} most common words in the above list?",
        answer_prefix=f"Answer: The top {num_common} words that appear most often in the list are:",
        answers=tuple(common),
        build_context=build,
    )


def _place(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(3)).capitalize()


def gen_qa_retrieval(rng, depth, words, tokenizer, num_facts: int = 4) -> TaskContent:
    fact, question = rng.choice(_QA_FACTS)
    places, people = [], []
    while len(places) < num_facts:
        place, person = _place(rng), f"{rng.choice(_FIRST_NAMES)} {rng.choice(_LAST_NAMES)}"
        if place not in places and person not in people:
            places.append(place)
            people.append(person)
    depths = [depth] + [rng.random() for _ in range(num_facts - 1)]
    instruction = (
        "Answer the question based on the given documents. Only give me the answer and do not output any "
        "other words.\n\nThe following are given documents."
    )
    return TaskContent(
        instruction=instruction,
        question=instruction.split("\n\n")[0] + f"\n\nQuestion: {question.format(place=places[0])}",
        answer_prefix="Answer:",
        answers=(people[0],),
        pieces=tuple(Piece(d, fact.format(place=p, name=n)) for d, p, n in zip(depths, places, people, strict=True)),
    )


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("niah_single", gen_niah_single, "all", 16, description="one needle at the depth"),
        TaskSpec("niah_multikey", gen_niah_multikey, "all", 16, description="one of four keys"),
        TaskSpec("niah_multivalue", gen_niah_multivalue, "all", 48, description="four values of one key"),
        TaskSpec("niah_multiquery", gen_niah_multiquery, "all", 40, description="two of four keys"),
        TaskSpec("variable_tracking", gen_variable_tracking, "all", 32, description="a five-name chain"),
        TaskSpec("common_words", gen_common_words, "all", 48, uses_depth=False,
                 description="ten most frequent words of a list"),
        TaskSpec("qa_retrieval", gen_qa_retrieval, "any", 16, description="a name from one fact among four"),
    )
}


def case_id(task: str, length: int, depth: float | None, sample: int) -> str:
    """Stable identifier of one case, e.g. ``niah_single-L4096-d050-s0`` (``dNA`` without depth)."""
    d = "NA" if depth is None else f"{round(depth * 100):03d}"
    return f"{task}-L{length}-d{d}-s{sample}"


def case_seed(seed: int, task: str, length: int, depth: float | None, sample: int) -> int:
    return zlib.crc32(f"{seed}|{case_id(task, length, depth, sample)}".encode())


def _render(tokenizer, content: TaskContent, chat: bool) -> tuple[str, str]:
    """Prompt text before and after the context."""
    user = f"{content.instruction}\n\n{CONTEXT_MARK}\n\n{content.question}"
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        text += content.answer_prefix
    else:
        text = f"{user}\n{content.answer_prefix}"
    head, tail = text.split(CONTEXT_MARK)
    return head, tail


def _bos(tokenizer, chat: bool) -> list[int]:
    """The BOS id the tokenizer itself adds to plain text (chat templates write their own)."""
    if chat or tokenizer.bos_token_id is None:
        return []
    ids = tokenizer("a")["input_ids"]
    return [tokenizer.bos_token_id] if ids and ids[0] == tokenizer.bos_token_id else []


def _insert(context: list[int], cuts: list[int], pieces: list[list[int]], depths: list[float]):
    """Insert ``pieces`` at the sentence boundary nearest each depth; returns ids and piece offsets."""
    n = len(context)
    spots = [min(cuts, key=lambda c, t=d * n: (abs(c - t), c)) for d in depths]
    order = sorted(range(len(pieces)), key=lambda i: (spots[i], i))
    out: list[int] = []
    starts = [0] * len(pieces)
    prev = 0
    for i in order:
        out.extend(context[prev : spots[i]])
        prev = spots[i]
        starts[i] = len(out)
        out.extend(pieces[i])
    out.extend(context[prev:])
    return out, starts


def build_case(
    tokenizer,
    task: str,
    length: int,
    depth: float | None = 0.5,
    sample: int = 0,
    *,
    seed: int = 0,
    haystack: str | Haystack = "essays",
    chat: bool | None = None,
) -> dict:
    """One case of ``task`` as a dict (a row of :func:`build_suite`'s dataset).

    ``depth`` (0..1) places the task's main piece in the context; ignored (stored as None) for tasks
    without depth. ``chat`` uses the tokenizer's chat template (default: when it has one).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    spec = TASKS[task]
    if not spec.uses_depth:
        depth = None
    elif depth is None or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be a number in [0, 1] for task {task!r}, got {depth!r}")
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    hay = load_haystack(tokenizer, haystack) if isinstance(haystack, str) else haystack
    rng = random.Random(case_seed(seed, task, length, depth, sample))
    content = spec.generate(rng, 0.0 if depth is None else depth, essay_words(), tokenizer)
    head_text, tail_text = _render(tokenizer, content, chat)
    head = _bos(tokenizer, chat) + encode(tokenizer, head_text)
    tail = encode(tokenizer, tail_text)
    # pieces start with a space: they follow a sentence end inside running prose
    piece_ids = [encode(tokenizer, " " + p.text) for p in content.pieces]
    budget = length - len(head) - len(tail) - sum(map(len, piece_ids))
    if budget < 0:
        raise ValueError(
            f"length {length} is too short for task {task!r}: its prompt alone takes {length - budget} tokens"
        )
    if content.build_context is not None:
        context, starts = content.build_context(budget), []
    else:
        hay_ids, cuts = hay.context(budget, rng)
        context, starts = _insert(hay_ids, cuts, piece_ids, [p.depth for p in content.pieces])
    input_ids = head + context + tail
    if len(input_ids) != length:  # construction invariant, not user input
        raise RuntimeError(f"built {len(input_ids)} tokens for a {length}-token case of {task!r}")
    return {
        "id": case_id(task, length, depth, sample),
        "task": task,
        "length": length,
        "depth": depth,
        "sample": sample,
        "seed": case_seed(seed, task, length, depth, sample),
        "haystack": hay.name if content.build_context is None else "none",
        "input_ids": input_ids,
        "answers": list(content.answers),
        "needles": [p.text for p in content.pieces],
        "context_start": len(head),
        "context_end": len(head) + len(context),
        "needle_starts": [len(head) + s for s in starts],
        "needle_lengths": [len(p) for p in piece_ids] if content.build_context is None else [],
        "question": content.question,
        "answer_prefix": content.answer_prefix,
        "metric": spec.metric,
        "max_new_tokens": spec.max_new_tokens,
        "tokenizer": tokenizer_key(tokenizer),
    }


def parse_length(text: str | int, flag: str = "length") -> int:
    """``"4K"``/``"4k"`` -> 4096, ``"1000"`` -> 1000 (the one length syntax: :func:`fp_tools.args.parse_length`)."""
    from fp_tools.args import parse_length as parse

    return parse(text, flag)


def suite_cases(
    tasks: Iterable[str], lengths: Iterable[int], depths: Iterable[float], samples: int
) -> list[tuple[str, int, float | None, int]]:
    """The (task, length, depth, sample) grid: tasks without depth get ``samples`` cases per length."""
    out = []
    depths = list(depths)
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
        for length in lengths:
            for depth in depths if TASKS[task].uses_depth else [None]:
                out.extend((task, length, depth, s) for s in range(samples))
    return out


def build_suite(
    tokenizer,
    tasks: Iterable[str] = tuple(TASKS),
    lengths: Iterable[int | str] = (1024, 2048, 4096),
    depths: Iterable[float] = (0.1, 0.5, 0.9),
    samples: int = 1,
    *,
    seed: int = 0,
    haystack: str = "essays",
    chat: bool | None = None,
):
    """The suite as a ``datasets.Dataset`` (one row per case; see :func:`build_case` for the columns).

    Save it with ``ds.save_to_disk(path)`` and reload with ``datasets.load_from_disk(path)``.
    """
    import datasets

    lengths = [parse_length(x) for x in lengths]
    hay = load_haystack(tokenizer, haystack)
    rows = [
        build_case(tokenizer, t, n, d, s, seed=seed, haystack=hay, chat=chat)
        for t, n, d, s in suite_cases(tasks, lengths, depths, samples)
    ]
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "task": datasets.Value("string"),
            "length": datasets.Value("int32"),
            "depth": datasets.Value("float32"),
            "sample": datasets.Value("int32"),
            "seed": datasets.Value("int64"),
            "haystack": datasets.Value("string"),
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "answers": datasets.Sequence(datasets.Value("string")),
            "needles": datasets.Sequence(datasets.Value("string")),
            "context_start": datasets.Value("int32"),
            "context_end": datasets.Value("int32"),
            "needle_starts": datasets.Sequence(datasets.Value("int32")),
            "needle_lengths": datasets.Sequence(datasets.Value("int32")),
            "question": datasets.Value("string"),
            "answer_prefix": datasets.Value("string"),
            "metric": datasets.Value("string"),
            "max_new_tokens": datasets.Value("int32"),
            "tokenizer": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_list(rows, features=features)
