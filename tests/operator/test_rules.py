"""BlockRules: one validated object for the block rules, accepted by the operator, the reference and the
stages, and the base of FlashPrefillConfig (same fields, same checks, same JSON keys)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from fp_kernels import BlockRules, flash_prefill, flash_prefill_reference
from fp_kernels.api import OP_SCHEMA
from fp_kernels.rules import RULE_FIELDS
from support.kernel_checks import kernel_dtypes

from fp_patch import FlashPrefillConfig
from fp_tools.synthetic import structured_qkv

# (field value, error type, words the message must contain: the field, what was expected, what came)
BAD_RULES = {
    "alpha below 0": ({"alpha": -0.1}, ValueError, ["alpha", r"\[0, 1\]", "-0.1"]),
    "alpha above 1": ({"alpha": 1.5}, ValueError, ["alpha", r"\[0, 1\]", "1.5"]),
    "alpha nan": ({"alpha": float("nan")}, ValueError, ["alpha", r"\[0, 1\]", "nan"]),
    "alpha as string": ({"alpha": "0.1"}, TypeError, ["alpha", "float", "str", "pass a number"]),
    "alpha as bool": ({"alpha": True}, TypeError, ["alpha", "float", "bool"]),
    "alpha None": ({"alpha": None}, TypeError, ["alpha", "NoneType"]),
    "block_size not a power of two": ({"block_size": 100}, ValueError, ["block_size", "power of two", "100"]),
    "block_size too small": ({"block_size": 8}, ValueError, ["block_size", ">= 16", "8"]),
    "block_size as float": ({"block_size": 128.0}, TypeError, ["block_size", "int", "float 128.0"]),
    "block_size as bool": ({"block_size": True}, TypeError, ["block_size", "int", "bool"]),
    "negative sink_blocks": ({"sink_blocks": -1}, ValueError, ["sink_blocks", ">= 0", "-1"]),
    "fractional window_blocks": ({"window_blocks": 1.5}, TypeError, ["window_blocks", "int", "1.5"]),
    "last_dense_blocks None": ({"last_dense_blocks": None}, TypeError, ["last_dense_blocks", "int", "None"]),
    "negative min_budget": ({"min_budget": -2}, ValueError, ["min_budget", ">= 0", "-2"]),
    "min_budget as string": ({"min_budget": "4"}, TypeError, ["min_budget", "int", "'4'"]),
    "group_select as int": ({"group_select": 1}, TypeError, ["group_select", "True or False", "int 1"]),
    "mean_correction as string": ({"mean_correction": "yes"}, TypeError, ["mean_correction", "True or False"]),
}


@pytest.mark.parametrize("name", list(BAD_RULES))
def test_bad_rule_is_the_right_error_with_a_clear_message(name):
    """One error type per kind of mistake, in BlockRules, in FlashPrefillConfig and in flash_prefill's
    keywords alike (they all go through BlockRules.__post_init__). The operator's keywords read None as
    "not given" (the default), so None is only an error in the objects."""
    bad, error, words = BAD_RULES[name]
    q = k = v = torch.randn(1, 32, 1, 64)
    builds = [lambda: BlockRules(**bad), lambda: FlashPrefillConfig(**bad), lambda: BlockRules().replace(**bad)]
    if None not in bad.values():
        builds += [lambda: flash_prefill_reference(q, k, v, **bad), lambda: flash_prefill(q, k, v, **bad)]
    for build in builds:
        with pytest.raises(error) as caught:
            build()
        assert type(caught.value) is error
        for word in words:
            assert caught.match(word), (name, word, str(caught.value))


def test_defaults_and_normalisation():
    rules = BlockRules()
    assert dataclasses.astuple(rules) == (0.12, 128, 2, 4, 2, 0, False, False)
    assert RULE_FIELDS == ("alpha", "block_size", "sink_blocks", "window_blocks", "last_dense_blocks", "min_budget",
                           "group_select", "mean_correction")
    assert type(BlockRules(alpha=0).alpha) is float and BlockRules(alpha=1).alpha == 1.0
    assert not BlockRules(alpha=0).needs_scores and BlockRules(alpha=0, min_budget=1).needs_scores
    with pytest.raises(dataclasses.FrozenInstanceError):
        rules.alpha = 0.5
    with pytest.raises(ValueError, match="alfa"):
        rules.replace(alfa=0.5)
    assert rules.replace(alpha=0.3) == BlockRules(alpha=0.3) and hash(rules) == hash(BlockRules())
    assert BlockRules.from_scalars(BlockRules(0.3, 64, 1, 2, 3, 4, True, True).as_scalars()) == BlockRules(
        0.3, 64, 1, 2, 3, 4, True, True)


def test_custom_op_schema_follows_the_fields():
    """The op takes the rules as scalars, one argument per field in declaration order."""
    args = OP_SCHEMA.split("(", 1)[1].split(")", 1)[0]
    assert args.endswith(", float alpha, int block_size, int sink_blocks, int window_blocks, int last_dense_blocks, "
                         "int min_budget, bool group_select, bool mean_correction")
    assert torch.ops.fp_kernels.flash_prefill.default._schema.arguments[-1].name == "mean_correction"


def test_config_is_the_rules_plus_its_own_fields_and_round_trips_through_json(tmp_path):
    cfg = FlashPrefillConfig(alpha=0.3, block_size=64, sink_blocks=1, window_blocks=3, last_dense_blocks=0,
                             min_budget=5, group_select=True, mean_correction=True, layer_alpha={7: 0.05},
                             dense_layers=[0])
    data = json.loads(cfg.to_json())
    # the JSON stays flat: the rule fields are top-level keys, as before
    for name in RULE_FIELDS:
        assert data[name] == getattr(cfg, name)
    assert "rules" not in data
    back = FlashPrefillConfig.from_json(cfg.to_json(tmp_path / "cfg.json"))
    assert back == cfg and FlashPrefillConfig.from_dict(cfg.to_dict()) == cfg
    want = BlockRules(alpha=0.3, block_size=64, sink_blocks=1, window_blocks=3, last_dense_blocks=0, min_budget=5,
                      group_select=True, mean_correction=True)
    for config in (cfg, back):
        assert type(config.rules_for(0)) is BlockRules and config.rules_for(0) == want
        assert config.rules_for(None) == want and config.block_rules() == want
        assert config.rules_for(7) == want.replace(alpha=0.05)
        assert config.rules_for(7) is config.rules_for(7), "built once, with the settings"
    assert cfg.replace(alpha=0.4).rules_for(3).alpha == 0.4
    assert cfg.replace(layer_alpha={}).rules_for(7).alpha == 0.3


def qkv(seed=0, dtype=torch.float32):
    q, k, v = structured_qkv(1, 300, 4, 2, 64, block_size=32, topics=3, seed=seed)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_rules_object_equals_the_keywords(backend):
    """``rules=BlockRules(...)`` gives the same bits as the keywords, positional or named, and a
    different setting gives a different selection (the comparison can fail)."""
    dtype = torch.float32 if backend == "reference" else kernel_dtypes()[0]
    q, k, v = qkv(dtype=dtype)
    rules = BlockRules(alpha=0.3, block_size=32, sink_blocks=1, window_blocks=2, last_dense_blocks=1,
                       min_budget=2, group_select=True, mean_correction=True)
    out, info = flash_prefill(q, k, v, rules=rules, return_info=True, backend=backend)
    assert not torch.isnan(out).any()
    positional, pos_info = flash_prefill(q, k, v, 0.3, 32, 1, 2, 1, 2, None, group_select=True,
                                         mean_correction=True, return_info=True, backend=backend)
    named = flash_prefill(q, k, v, alpha=0.3, block_size=32, sink_blocks=1, window_blocks=2, last_dense_blocks=1,
                          min_budget=2, group_select=True, mean_correction=True, backend=backend)
    torch.testing.assert_close(out, positional, atol=0, rtol=0)
    torch.testing.assert_close(out, named, atol=0, rtol=0)
    assert torch.equal(info.block_index, pos_info.block_index) and torch.equal(info.block_count, pos_info.block_count)
    other, other_info = flash_prefill(q, k, v, rules=rules.replace(alpha=0.9, min_budget=0), return_info=True,
                                      backend=backend)
    assert not torch.equal(other_info.block_count, info.block_count)
    # the reference takes the object the same way
    ref = flash_prefill_reference(q.float(), k.float(), v.float(), rules=rules)
    ref_kw = flash_prefill_reference(q.float(), k.float(), v.float(), 0.3, 32, 1, 2, 1, 2, group_select=True,
                                     mean_correction=True)
    torch.testing.assert_close(ref, ref_kw, atol=0, rtol=0)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_defaults_are_the_rules_defaults():
    q, k, v = qkv()
    torch.testing.assert_close(flash_prefill_reference(q, k, v), flash_prefill_reference(q, k, v, rules=BlockRules()),
                               atol=0, rtol=0)


@pytest.mark.parametrize("fn", [flash_prefill, flash_prefill_reference], ids=lambda f: f.__name__)
def test_rules_and_a_rule_keyword_is_an_error(fn):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"rules= and the rule keyword\(s\) \['alpha'\]; pass one or the other"):
        fn(q, k, v, 0.2, rules=BlockRules())
    with pytest.raises(ValueError, match=r"\['block_size', 'mean_correction'\].*rules=rules.replace\("):
        fn(q, k, v, block_size=64, mean_correction=False, rules=BlockRules())
    with pytest.raises(TypeError, match="rules must be a fp_kernels.BlockRules, got dict"):
        fn(q, k, v, rules={"alpha": 0.2})
    with pytest.raises(TypeError, match=r"plain BlockRules.*rules_for\(layer_idx\)"):
        fn(q, k, v, rules=FlashPrefillConfig(layer_alpha={0: 0.5}))
