"""Section 7 analyses on matrices with known answers, plots, and experiments/analyze.py end to end."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from omegaconf import OmegaConf
from safetensors.numpy import load_file

from lora_jax.adapters import save_adapter
from lora_jax.analysis import (
    adapter_similarity,
    amplification,
    by_kind,
    expected_random_similarity,
    grassmann_similarity,
    input_directions,
    lora_factors,
    low_rank_singular_vectors,
    mean_over_layers,
    projection_norm,
    random_gaussian_control,
    random_orthonormal,
    split_layer,
    top_singular_vectors,
)
from lora_jax.lora import LoraConfig, lora_wrap

ROOT = Path(__file__).resolve().parents[1]


def brute_force_phi(a1, a2):
    """The definition, cell by cell: ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j)."""
    u1, u2 = np.linalg.svd(a1, full_matrices=False)[0], np.linalg.svd(a2, full_matrices=False)[0]
    r1, r2 = u1.shape[1], u2.shape[1]
    phi = np.empty((r1, r2))
    for i in range(1, r1 + 1):
        for j in range(1, r2 + 1):
            phi[i - 1, j - 1] = np.linalg.norm(u1[:, :i].T @ u2[:, :j]) ** 2 / min(i, j)
    return phi


def test_matches_the_definition_and_stays_in_unit_interval():
    rng = np.random.default_rng(0)
    a1, a2 = rng.standard_normal((20, 3)), rng.standard_normal((20, 7))
    phi = grassmann_similarity(a1, a2)
    assert phi.shape == (3, 7)
    np.testing.assert_allclose(phi, brute_force_phi(a1, a2), atol=1e-12)
    assert phi.min() >= 0 and phi.max() <= 1 + 1e-12


def test_identical_subspaces_give_one_everywhere():
    a = np.random.default_rng(1).standard_normal((16, 5))
    np.testing.assert_allclose(grassmann_similarity(a, a), 1.0, atol=1e-12)


def test_orthogonal_subspaces_give_zero():
    eye = np.eye(12)
    rng = np.random.default_rng(2)
    a1 = eye[:, :4] @ rng.standard_normal((4, 4))  # inside span(e1..e4)
    a2 = eye[:, 4:] @ rng.standard_normal((8, 6))  # inside span(e5..e12)
    np.testing.assert_allclose(grassmann_similarity(a1, a2), 0.0, atol=1e-12)


def test_a_shared_top_direction():
    # Both have e1 as their strongest direction; their other directions are orthogonal to each other.
    eye = np.eye(10)
    a1 = np.stack([10 * eye[:, 0], eye[:, 1], 0.5 * eye[:, 2]], axis=1)
    a2 = np.stack([7 * eye[:, 0], 2 * eye[:, 3], eye[:, 4], 0.1 * eye[:, 5]], axis=1)
    phi = grassmann_similarity(a1, a2)
    assert phi[0, 0] == pytest.approx(1.0)
    np.testing.assert_allclose(phi[0, :], 1.0)  # e1 lies in every top-j subspace of A2 ...
    np.testing.assert_allclose(phi[:, 0], 1.0)  # ... and in every top-i subspace of A1
    i, j = np.meshgrid(np.arange(1, 4), np.arange(1, 5), indexing="ij")
    np.testing.assert_allclose(phi, 1.0 / np.minimum(i, j))  # only that one direction is shared


def test_random_pairs_match_the_expected_value():
    d, r1, r2, draws = 24, 4, 8, 500
    rng = np.random.default_rng(3)
    samples = np.stack([random_gaussian_control(d, r1, r2, rng) for _ in range(draws)])
    expected = expected_random_similarity(d, r1, r2)
    np.testing.assert_allclose(expected, np.maximum.outer(np.arange(1, r1 + 1), np.arange(1, r2 + 1)) / d)
    stderr = samples.std(axis=0) / np.sqrt(draws)
    assert np.all(np.abs(samples.mean(axis=0) - expected) < 5 * stderr)
    assert random_gaussian_control(d, r1, r2, 7).shape == (r1, r2)
    np.testing.assert_array_equal(random_gaussian_control(d, r1, r2, 7), random_gaussian_control(d, r1, r2, 7))


def test_invariances():
    rng = np.random.default_rng(4)
    a1, a2 = rng.standard_normal((18, 4)), rng.standard_normal((18, 6))
    phi = grassmann_similarity(a1, a2)
    q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    signs_and_order = np.eye(4)[:, [2, 0, 3, 1]] * np.array([1, -1, -1, 1])
    # c A Q for any c != 0 and orthogonal Q (sign flips, permutations) leaves A A^T's directions as they were.
    for transform in (q, signs_and_order, -3.5 * np.eye(4)):
        np.testing.assert_allclose(grassmann_similarity(a1 @ transform, a2), phi, atol=1e-10)
        np.testing.assert_allclose(grassmann_similarity(a2, a1 @ transform), phi.T, atol=1e-10)
    # Any invertible M (e.g. rescaled columns) keeps the span: the full-rank row and column do not move ...
    for m in (np.diag([1e-2, 3.0, 0.5, 20.0]), rng.standard_normal((4, 4))):
        moved = grassmann_similarity(a1 @ m, a2)
        np.testing.assert_allclose(moved[-1, :], phi[-1, :], atol=1e-10)
        np.testing.assert_allclose(grassmann_similarity(a2, a1 @ m)[:, -1], phi.T[:, -1], atol=1e-10)
    # ... but the ordering of directions is part of phi: rescaling columns changes the top direction.
    assert not np.allclose(grassmann_similarity(a1 @ np.diag([1e-2, 3.0, 0.5, 20.0]), a2)[0], phi[0])


def test_input_directions_are_lora_a_left_singular_vectors_the_papers_right_ones():
    rng = np.random.default_rng(5)
    paper_a = rng.standard_normal((3, 11))  # the paper's A: r x d_in
    u = input_directions(paper_a.T)  # lora_jax's lora_a = A^T
    v_paper = np.linalg.svd(paper_a, full_matrices=False)[2].T  # the paper's right-singular vectors
    np.testing.assert_allclose(np.abs(u.T @ v_paper), np.eye(3), atol=1e-10)


def test_mismatched_dimensions_are_refused():
    with pytest.raises(ValueError, match="different spaces"):
        grassmann_similarity(np.ones((8, 2)), np.ones((9, 2)))
    with pytest.raises(ValueError, match="2-D"):
        grassmann_similarity(np.ones(8), np.ones((8, 2)))


# ---------------------------------------------------------------------------------------------------------------
# Grouping adapters
# ---------------------------------------------------------------------------------------------------------------


def test_split_layer_is_generic():
    assert split_layer("bert.encoder.layer.3.attention.self.query") == ("attention.self.query", 3)
    assert split_layer("transformer.h.11.attn.c_attn.q") == ("attn.c_attn.q", 11)
    assert split_layer("encoder.block.2.layer.0.SelfAttention.q") == ("layer.0.SelfAttention.q", 2)
    assert split_layer("pooler.dense") == ("pooler.dense", None)


def adapter_tensors(rng, layers=3, r=4, d=10, prefix="params."):
    tensors = {}
    for i in range(layers):
        for kind in ("query", "value"):
            base = f"{prefix}bert.encoder.layer.{i}.attention.self.{kind}"
            tensors[f"{base}.lora_a"] = rng.standard_normal((d, r)).astype(np.float32)
            tensors[f"{base}.lora_b"] = rng.standard_normal((r, d)).astype(np.float32)
            tensors[f"{base}.lora_scale"] = np.array([2.0], np.float32)  # older files store shape (1,)
    tensors[f"{prefix}classifier.kernel"] = np.zeros((d, 2), np.float32)
    return tensors


def test_lora_factors_groups_by_kind_and_layer_with_or_without_params_prefix():
    rng = np.random.default_rng(6)
    with_prefix = lora_factors(adapter_tensors(rng))
    without = lora_factors(adapter_tensors(np.random.default_rng(6), prefix=""))
    assert [f.path for f in with_prefix] == [f.path for f in without]
    grouped = by_kind(with_prefix)
    assert sorted(grouped) == ["attention.self.query", "attention.self.value"]
    assert list(grouped["attention.self.query"]) == [0, 1, 2]
    f = grouped["attention.self.value"][1]
    assert f.path == "bert.encoder.layer.1.attention.self.value" and f.scale == 2.0 and f.rank == 4
    np.testing.assert_allclose(f.delta, 2.0 * f.a.astype(np.float64) @ f.b)

    phi = adapter_similarity(with_prefix, without)
    np.testing.assert_allclose(phi["attention.self.query"][2], 1.0, atol=1e-5)  # same tensors
    np.testing.assert_allclose(mean_over_layers(phi["attention.self.value"]), 1.0, atol=1e-5)


def test_lora_factors_handles_fused_slices_and_a_missing_scale():
    rng = np.random.default_rng(7)
    tensors = {"h.0.attn.c_attn.lora_a_v": rng.standard_normal((6, 2)),
               "h.0.attn.c_attn.lora_b_v": rng.standard_normal((2, 6)),
               "h.0.attn.c_attn.lora_slice_v": np.array(2, np.int32)}  # fmt: skip
    (f,) = lora_factors(tensors, default_scale=0.5)
    assert (f.path, f.module_path, f.kind, f.layer, f.slice_index, f.scale) == (
        "h.0.attn.c_attn.v", "h.0.attn.c_attn", "attn.c_attn.v", 0, 2, 0.5
    )  # fmt: skip
    with pytest.raises(ValueError, match="default_scale"):
        lora_factors(tensors)
    with pytest.raises(ValueError, match="needs both"):
        lora_factors({"x.0.q.lora_a": np.ones((4, 2)), "x.0.q.lora_scale": np.array(1.0)})


def test_adapters_without_common_modules_are_refused():
    rng = np.random.default_rng(8)
    a = lora_factors({"m.0.q.lora_a": rng.standard_normal((4, 2)), "m.0.q.lora_b": np.ones((2, 4))}, 1.0)
    b = lora_factors({"m.0.k.lora_a": rng.standard_normal((4, 2)), "m.0.k.lora_b": np.ones((2, 4))}, 1.0)
    with pytest.raises(ValueError, match="share no adapted module"):
        adapter_similarity(a, b)


# ---------------------------------------------------------------------------------------------------------------
# Amplification (Table 7)
# ---------------------------------------------------------------------------------------------------------------


def known_w(d_in=14, d_out=10, seed=9):
    """W = P diag(s) Q^T with distinct, known singular values s."""
    rng = np.random.default_rng(seed)
    p, _ = np.linalg.qr(rng.standard_normal((d_in, d_out)))
    q, _ = np.linalg.qr(rng.standard_normal((d_out, d_out)))
    s = np.linspace(10.0, 1.0, d_out)
    return p @ np.diag(s) @ q.T, p, s, q


def test_amplification_with_delta_along_w_top_vs_bottom_directions():
    w, p, s, q = known_w()
    r, t = 3, np.array([0.3, 0.2, 0.1])
    top = amplification(w, p[:, :r] * t, q[:, :r].T, scale=2.0, rng=0)
    assert top.r == r
    assert top.w_norm == pytest.approx(np.sqrt((s**2).sum()))
    assert top.delta_norm == pytest.approx(2.0 * np.sqrt((t**2).sum()))
    assert top.proj_delta == pytest.approx(np.sqrt((s[:r] ** 2).sum()))
    assert top.proj_w == pytest.approx(np.sqrt((s[:r] ** 2).sum()))
    assert top.factor == pytest.approx(top.delta_norm / np.sqrt((s[:r] ** 2).sum()))

    bottom = amplification(w, p[:, -r:] * t, q[:, -r:].T, scale=2.0, rng=0)
    assert bottom.proj_delta == pytest.approx(np.sqrt((s[-r:] ** 2).sum()))
    assert bottom.proj_w == pytest.approx(top.proj_w)
    assert bottom.factor > top.factor  # amplifying directions W does not emphasise


def test_amplification_is_orientation_consistent_and_uses_only_the_span_of_delta():
    w, *_ = known_w(seed=10)
    rng = np.random.default_rng(11)
    a, b = rng.standard_normal((14, 4)), rng.standard_normal((4, 10))
    ours = amplification(w, a, b, scale=0.5, rng=1)
    paper = amplification(w.T, b.T, a.T, scale=0.5, rng=1)  # the paper's orientation: W^T, delta W^T = B^T A^T
    for field in ("w_norm", "delta_norm", "proj_delta", "proj_w"):
        assert getattr(ours, field) == pytest.approx(getattr(paper, field))
    m = rng.standard_normal((4, 4))  # A B = (A M)(M^-1 B): same delta W, same numbers
    same = amplification(w, a @ m, np.linalg.solve(m, b), scale=0.5, rng=1)
    assert same.proj_delta == pytest.approx(ours.proj_delta) and same.delta_norm == pytest.approx(ours.delta_norm)


def test_low_rank_singular_vectors_match_the_full_svd():
    rng = np.random.default_rng(12)
    a, b = rng.standard_normal((15, 3)), rng.standard_normal((3, 9))
    u, v = low_rank_singular_vectors(a, b)
    u_full, v_full = top_singular_vectors(a @ b, 3)
    np.testing.assert_allclose(np.abs(u.T @ u_full), np.eye(3), atol=1e-8)
    np.testing.assert_allclose(np.abs(v.T @ v_full), np.eye(3), atol=1e-8)


def test_random_projection_matches_its_expectation():
    # For uniformly random r-frames U, V: E||U^T W V||_F^2 = ||W||_F^2 r^2 / (d_in d_out).
    w, *_ = known_w(seed=13)
    rng, r, draws = np.random.default_rng(14), 3, 400
    sq = np.array([projection_norm(w, random_orthonormal(14, r, rng), random_orthonormal(10, r, rng)) ** 2
                   for _ in range(draws)])  # fmt: skip
    expected = np.linalg.norm(w) ** 2 * r**2 / (14 * 10)
    assert abs(sq.mean() - expected) < 5 * sq.std() / np.sqrt(draws)
    frame = random_orthonormal(14, r, rng)
    np.testing.assert_allclose(frame.T @ frame, np.eye(r), atol=1e-12)


def test_amplification_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="d_in x d_out kernel"):
        amplification(np.ones((6, 4)), np.ones((4, 2)), np.ones((2, 6)))


# ---------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------


def heatmap_shapes(fig):
    return [ax.images[0].get_array().shape for ax in fig.axes if ax.images]


def test_plots_write_pngs_with_the_expected_panels(tmp_path):
    plt_image = pytest.importorskip("matplotlib.image")
    from lora_jax.analysis.plots import figure3, figure4, heatmap_grid

    rng = np.random.default_rng(15)
    at_layer = {"query": grassmann_similarity(rng.standard_normal((20, 3)), rng.standard_normal((20, 8))),
                "value": grassmann_similarity(rng.standard_normal((20, 3)), rng.standard_normal((20, 8)))}  # fmt: skip
    fig = figure3(at_layer, at_layer, 1, tmp_path / "f3.png")
    assert heatmap_shapes(fig) == [(3, 8)] * 4
    heatmap_axes = [ax for ax in fig.axes if ax.images]
    assert [t.get_text() for t in heatmap_axes[0].get_xticklabels()][0] == "1"
    assert [t.get_text() for t in heatmap_axes[0].get_xticklabels()][-1] == "8"
    assert heatmap_axes[0].get_xlabel() == "j" and heatmap_axes[0].get_ylabel() == "i"

    fig = figure4(at_layer, random_gaussian_control(20, 3, 8, 0), 1, tmp_path / "f4.png", crop=2)
    assert heatmap_shapes(fig) == [(2, 2)] * 3
    for name in ("f3.png", "f4.png"):
        image = plt_image.imread(tmp_path / name)
        assert image.shape[0] > 100 and image.shape[1] > 300 and image.std() > 0.01  # drawn, not blank

    with pytest.raises(ValueError, match="at least one panel"):
        heatmap_grid([[]], tmp_path / "empty.png")


# ---------------------------------------------------------------------------------------------------------------
# experiments/analyze.py end to end
# ---------------------------------------------------------------------------------------------------------------


def fake_run(folder: Path, base: Path, params, r: int, seed: int, wrap_params_key: bool) -> Path:
    """A run folder as run.py writes it: config.yaml naming the base model and adapter/ with trained B."""
    tree = {"params": params} if wrap_params_key else params  # keys with and without a leading "params."
    config = LoraConfig(r=r, alpha=2 * r, targets=("query", "value"))
    wrapped = lora_wrap(tree, config, jax.random.key(seed))
    rng = np.random.default_rng(seed)

    def train_b(path, leaf):
        return rng.standard_normal(leaf.shape).astype(np.float32) if path[-1].key == "lora_b" else leaf

    save_adapter(folder / "adapter", jax.tree_util.tree_map_with_path(train_b, wrapped), config)
    (folder / "config.yaml").write_text(f"model:\n  name_or_path: {base}\nlora:\n  r: {r}\n")
    return folder


@pytest.mark.slow
def test_analyze_end_to_end(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lora_jax.models import hub

    hf_config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=20)  # fmt: skip
    hf = transformers.BertModel(hf_config).eval()
    hf.save_pretrained(tmp_path / "base")
    _, params, _, _ = hub.from_pretrained(tmp_path / "base", task="base")
    run_a = fake_run(tmp_path / "exp" / "r4", tmp_path / "base", params, r=4, seed=0, wrap_params_key=False)
    run_b = fake_run(tmp_path / "exp" / "r8", tmp_path / "base", params, r=8, seed=1, wrap_params_key=True)
    out = tmp_path / "analysis"
    cmd = [sys.executable, "experiments/analyze.py", f"runs=[{run_a},{run_b}]", f"out={out}", "layer=1", "crop=2"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    for name in ("fig3_r4__r8.png", "fig4_r4__r8.png", "fig3_r4__r8_crop2.png", "subspace.md", "table7.md"):
        assert (out / name).stat().st_size > 0, name
    tensors_a = load_file(str(run_a / "adapter" / "adapter.safetensors"))
    tensors_b = load_file(str(run_b / "adapter" / "adapter.safetensors"))
    assert any(k.startswith("params.") for k in tensors_b) and not any(k.startswith("params.") for k in tensors_a)

    (pair,) = json.loads((out / "subspace.json").read_text())
    assert pair["layer"] == 1 and pair["ranks"] == [4, 8] and pair["d_in"] == 32
    key = "bert.encoder.layer.1.attention.self.query.lora_a"
    np.testing.assert_allclose(pair["phi"]["attention.self.query"]["1"],
                               brute_force_phi(tensors_a[key], tensors_b["params." + key]), atol=1e-6)  # fmt: skip

    table = json.loads((out / "table7.json").read_text())
    value = table["r8"]["attention.self.value"]["1"]
    torch_w = hf.encoder.layer[1].attention.self.value.weight.detach().numpy().T  # kernel: d_in x d_out
    path = "params.bert.encoder.layer.1.attention.self.value"
    delta = 2.0 * tensors_b[path + ".lora_a"].astype(np.float64) @ tensors_b[path + ".lora_b"]
    assert value["r"] == 8
    assert value["w_norm"] == pytest.approx(np.linalg.norm(torch_w), rel=1e-5)
    assert value["delta_norm"] == pytest.approx(np.linalg.norm(delta), rel=1e-5)
    u, v = top_singular_vectors(delta, 8)
    assert value["proj_delta"] == pytest.approx(projection_norm(torch_w, u, v), rel=1e-4)
    assert value["proj_w"] == pytest.approx(np.sqrt((np.linalg.svd(torch_w, compute_uv=False)[:8] ** 2).sum()))
    assert value["amplification"] == pytest.approx(value["delta_norm"] / value["proj_delta"])
    assert "| r4 | 4 |" in (out / "table7.md").read_text()

    analyze = load_analyze_script()
    defaults = OmegaConf.load(ROOT / "conf" / "analyze.yaml")
    for hydra_only in ("hydra", "defaults"):
        defaults.pop(hydra_only)
    cfg = OmegaConf.merge(defaults, {"runs": [str(run_a), str(run_b)], "out": str(tmp_path / "only_value"),
                                     "weights": ["value"], "table7": False})  # fmt: skip
    analyze.analyze(cfg)
    (pair,) = json.loads((tmp_path / "only_value" / "subspace.json").read_text())
    assert list(pair["phi"]) == ["attention.self.value"] and pair["layer"] == 1  # the middle of layers 0, 1
    assert not (tmp_path / "only_value" / "table7.json").exists()
    for override, message in [
        ({"layer": 7}, "layer=7 is not adapted"),
        ({"weights": ["key"]}, "match none"),
        ({"runs": [str(tmp_path)]}, "No adapter in"),
        ({"runs": []}, "No runs given"),
    ]:
        with pytest.raises((ValueError, OSError), match=message):
            analyze.analyze(OmegaConf.merge(cfg, override))
    with pytest.raises(FileNotFoundError, match="base=<folder>"):
        (run_a / "config.yaml").unlink()
        analyze.analyze(OmegaConf.merge(cfg, {"table7": True}))


def load_analyze_script():
    spec = importlib.util.spec_from_file_location("analyze_script", ROOT / "experiments" / "analyze.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
