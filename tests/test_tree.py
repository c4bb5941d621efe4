"""lora_jax.tree: dotted paths, the two pattern rules, filtering and deep merging of parameter dicts."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from lora_jax.tree import combine, filter_leaves, leaf_paths, map_with_path, matches_leaf, matches_module

TREE = {"encoder": {"layer": {"0": {"query": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}}}}, "head": [1.0, 2.0]}


def test_leaf_paths_join_dict_keys_and_sequence_indices_with_dots():
    assert [p for p, _ in leaf_paths(TREE)] == [
        "encoder.layer.0.query.bias", "encoder.layer.0.query.kernel", "head.0", "head.1",
    ]  # fmt: skip


def test_map_with_path_sees_the_same_paths_and_keeps_the_structure():
    out = map_with_path(lambda path, leaf: path, TREE)
    assert out["encoder"]["layer"]["0"]["query"]["kernel"] == "encoder.layer.0.query.kernel"
    assert out["head"] == ["head.0", "head.1"]


@pytest.mark.parametrize(
    "pattern,path,module,leaf",
    [
        ("query", "encoder.layer.0.attention.self.query", True, True),
        ("query", "encoder.layer.0.attention.self.query_proj", False, False),  # whole components only
        ("attention.*dense", "encoder.layer.3.attention.output.dense", True, True),
        ("self", "encoder.layer.0.attention.self.query", False, True),  # a module must end the path; a leaf not
        ("classifier", "classifier.out_proj.kernel", False, True),
    ],
)
def test_module_rule_is_a_suffix_and_leaf_rule_is_anywhere(pattern, path, module, leaf):
    assert matches_module(pattern, path) is module
    assert matches_leaf(pattern, path) is leaf


def test_filter_drops_emptied_dicts_and_combine_puts_them_back():
    biases = filter_leaves(TREE, lambda path: path.endswith("bias"))
    assert biases == {"encoder": {"layer": {"0": {"query": {"bias": TREE["encoder"]["layer"]["0"]["query"]["bias"]}}}}}
    rest = filter_leaves(TREE, lambda path: not path.endswith("bias"))
    assert leaf_paths(combine(rest, biases)) and [p for p, _ in leaf_paths(combine(rest, biases))] == [
        p for p, _ in leaf_paths(TREE)
    ]
    override = combine(TREE, {"encoder": {"layer": {"0": {"query": {"bias": 7}}}}})
    assert override["encoder"]["layer"]["0"]["query"]["bias"] == 7  # extra wins
    assert override["encoder"]["layer"]["0"]["query"]["kernel"] is TREE["encoder"]["layer"]["0"]["query"]["kernel"]
