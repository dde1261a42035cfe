"""The block rules of a FlashPrefill call: one frozen object, validated once.

:class:`BlockRules` holds every setting that decides *which* key blocks a query block computes (and
how a skipped block is treated): ``alpha``, ``block_size``, ``sink_blocks``, ``window_blocks``,
``last_dense_blocks``, ``min_budget``, ``group_select``, ``mean_correction``. It travels as one
object through :func:`fp_kernels.flash_prefill`, the reference, the pipeline and the stages, and
``fp_patch.FlashPrefillConfig`` extends it (so the model-level settings carry the same fields with
the same checks).

Errors: a value of the wrong type raises ``TypeError`` (``alpha="0.1"``, ``block_size=128.0``,
``group_select=1``); a value of the right type outside its range raises ``ValueError``
(``alpha=1.5``, ``alpha=nan``, ``block_size=100``, ``sink_blocks=-1``). Each message names the
field, what was expected, what came and what to do.

Adding a rule: a field here (with its check in :meth:`BlockRules.__post_init__`), the kernels
that use it, the docs. The custom op's schema, ``FlashPrefillConfig`` and its JSON format follow
the fields of this class.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass


def check_fraction(name: str, value) -> float:
    """``value`` as a float in ``[0, 1]`` (``TypeError`` if not a real number, ``ValueError`` if outside)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a float in [0, 1] (0 = dense, larger = sparser), got {type(value).__name__} "
            f"{value!r}; pass a number such as 0.12"
        )
    if not 0.0 <= float(value) <= 1.0:  # NaN fails too
        raise ValueError(f"{name} must be a number in [0, 1] (0 = dense, larger = sparser), got {value!r}")
    return float(value)


def check_count(name: str, value, minimum: int = 0, meaning: str = "a number of blocks") -> int:
    """``value`` as an ``int >= minimum`` (``TypeError`` if not an int, ``ValueError`` if smaller)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name} must be an int >= {minimum} ({meaning}), got {type(value).__name__} {value!r}; "
            "pass a whole number"
        )
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} ({meaning}), got {value!r}")
    return int(value)


def check_flag(name: str, value) -> bool:
    """``value`` if it is ``True`` or ``False`` (``TypeError`` otherwise: ``1`` or ``"yes"`` are not flags)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}; pass bool({value!r})")
    return value


@dataclass(frozen=True)
class BlockRules:
    """Which key blocks each query block computes.

    Attributes:
        alpha: a float in ``[0, 1]``. Keep key block ``j`` of a query block when its score is at least
            ``alpha`` times the best block's (in probability terms): ``T_j >= log(alpha) + max T``.
            0 keeps every block (dense); larger is sparser.
        block_size: tokens per query/key block, a power of two >= 16.
        sink_blocks: the first key blocks, always computed (attention sinks).
        window_blocks: the last visible key blocks (diagonal included), always computed.
        last_dense_blocks: every block of the final query blocks of the prompt is computed.
        min_budget: additionally keep the ``min_budget`` best-scoring blocks of each query block.
        group_select: one selection per GQA group (the union of its query heads') instead of one
            per query head.
        mean_correction: give every skipped key block before the query block one stand-in term in
            the softmax (its length times the exponentiated score of its mean key, with its mean
            value) instead of dropping it; see :func:`fp_kernels.flash_prefill`.

    Defaults are the paper's (``B=128``, 2 sinks, 4 window blocks, 2 dense last query blocks).
    ``TypeError`` for a value of the wrong type, ``ValueError`` for one out of range.
    """

    alpha: float = 0.12
    block_size: int = 128
    sink_blocks: int = 2
    window_blocks: int = 4
    last_dense_blocks: int = 2
    min_budget: int = 0
    group_select: bool = False
    mean_correction: bool = False

    def __post_init__(self):
        object.__setattr__(self, "alpha", check_fraction("alpha", self.alpha))
        bs = self.block_size
        if isinstance(bs, bool) or not isinstance(bs, numbers.Integral):
            raise TypeError(
                f"block_size must be an int (a power of two >= 16, default 128), got {type(bs).__name__} {bs!r}; "
                "pass a whole number such as 64 or 128"
            )
        if bs < 16 or bs & (bs - 1):
            raise ValueError(f"block_size must be a power of two >= 16 (default 128), got {bs!r}; e.g. 64 or 128")
        object.__setattr__(self, "block_size", int(bs))
        for name in ("sink_blocks", "window_blocks", "last_dense_blocks", "min_budget"):
            object.__setattr__(self, name, check_count(name, getattr(self, name)))
        for name in ("group_select", "mean_correction"):
            check_flag(name, getattr(self, name))

    @property
    def needs_scores(self) -> bool:
        """Whether blocks are scored at all (with ``alpha == 0`` and no ``min_budget`` every block is kept)."""
        return self.alpha > 0 or self.min_budget > 0

    def replace(self, **changes):
        """A copy with ``changes`` applied (validated like the constructor); unknown names raise ``ValueError``."""
        names = field_names(type(self))
        unknown = set(changes) - set(names)
        if unknown:
            raise ValueError(f"unknown {type(self).__name__} field(s) {sorted(unknown)}; valid: {names}")
        return dataclasses.replace(self, **changes)

    def block_rules(self) -> BlockRules:
        """These rules as a plain :class:`BlockRules` (drops the fields a subclass adds)."""
        if type(self) is BlockRules:
            return self
        return BlockRules(**{name: getattr(self, name) for name in RULE_FIELDS})

    # the torch.library boundary: custom ops take scalars, not objects
    def as_scalars(self) -> tuple:
        """The fields in declaration order (what :func:`from_scalars` and the custom op's schema take)."""
        return tuple(getattr(self, name) for name in RULE_FIELDS)

    @staticmethod
    def from_scalars(values) -> BlockRules:
        """Inverse of :meth:`as_scalars`."""
        return BlockRules(*values)


def field_names(cls=BlockRules) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


RULE_FIELDS: tuple[str, ...] = tuple(field_names(BlockRules))

# torch.library schema types of the fields (the annotations are strings: `from __future__ import annotations`)
_SCHEMA_TYPES = {"float": "float", "int": "int", "bool": "bool"}


def schema_arguments() -> str:
    """The fields as ``torch.library`` schema arguments, e.g. ``"float alpha, int block_size, ..."``."""
    return ", ".join(f"{_SCHEMA_TYPES[f.type]} {f.name}" for f in dataclasses.fields(BlockRules))


def resolve_rules(rules: BlockRules | None, given: dict, where: str, remember: bool = True) -> BlockRules:
    """The rules of a call that takes both ``rules=`` and the individual rule keywords (``given``: the
    keywords that were passed, ``None`` meaning not passed). Passing both is an error; the keywords
    alone build a :class:`BlockRules` (missing ones take its defaults), remembered per distinct setting
    when ``remember`` (not while torch.compile traces)."""
    passed = {name: value for name, value in given.items() if value is not None}
    if rules is None:
        return _rules_from_keywords(passed) if remember else BlockRules(**passed)
    if passed:
        raise ValueError(
            f"{where}: got rules= and the rule keyword(s) {sorted(passed)}; pass one or the other, e.g. "
            f"rules=rules.replace({', '.join(f'{k}=...' for k in sorted(passed))})"
        )
    if not isinstance(rules, BlockRules):
        raise TypeError(f"{where}: rules must be a fp_kernels.BlockRules, got {type(rules).__name__} {rules!r}")
    if type(rules) is not BlockRules:
        raise TypeError(
            f"{where}: rules must be a plain BlockRules, got a {type(rules).__name__} (its per-layer settings would "
            "be ignored); pass config.rules_for(layer_idx) or config.block_rules()"
        )
    return rules


_KEYWORD_RULES: dict = {}
_MAX_KEYWORD_RULES = 256


def _rules_from_keywords(passed: dict) -> BlockRules:
    """``BlockRules(**passed)``, remembered per distinct setting (a model calls with one setting per layer).
    Keys hold the types too: ``True == 1`` and ``1.0 == 1`` hash alike but validate differently."""
    try:
        key = tuple(sorted((name, type(value), value) for name, value in passed.items()))
        rules = _KEYWORD_RULES.get(key)
    except TypeError:  # an unhashable value: the constructor says what is wrong
        return BlockRules(**passed)
    if rules is None:
        rules = BlockRules(**passed)
        if len(_KEYWORD_RULES) >= _MAX_KEYWORD_RULES:
            _KEYWORD_RULES.clear()
        _KEYWORD_RULES[key] = rules
    return rules
