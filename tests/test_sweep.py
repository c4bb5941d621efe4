"""A sweep over seed / lr / r / alpha trained as one program (lora_jax.sweep, experiment.run_packed) writes what the
same runs write one by one; padded rank slots stay exactly zero; what cannot be packed is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from lora_jax import sweep
from lora_jax.logging import read_jsonl
from lora_jax.lora import LoraConfig, lora_wrap
from lora_jax.methods import partition, trainable_mask
from lora_jax.tree import leaf_paths
from tests.conftest import save_tiny_bert, write_tiny_mrpc
from tests.test_train import run_config

TOL = 1e-5


def weight_atol(run: str) -> float:
    """Adam moves an element whose gradient sits near its eps by up to lr a step on float noise alone (summation
    order differs between a packed and a lone run), so trained weights are compared to 1% of one step at the run's
    rate (read from the run name's `_lr` tail); a real packing bug moves them by whole steps."""
    return max(TOL, 1e-2 * float(run.rsplit("_lr", 1)[1]))
# Three runs: seeds, learning rates, ranks and alphas all differ (run names carry each of them).
SWEEP = [("0", "1e-2", "2", "4"), ("1", "5e-3", "4", "4"), ("0", "2e-2", "4", "16")]
RUN = "run=r${lora.r}_a${lora.alpha}_s${seed}_lr${optim.lr}"


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), with_head=False, dropout=0.0)


@pytest.fixture(scope="module")
def tiny_glue(tmp_path_factory) -> Path:
    return write_tiny_mrpc(tmp_path_factory.mktemp("glue"))  # 48 train rows: 6 steps of 8 per epoch


def configs(tiny_bert, tiny_glue, results: Path, *extra: str):
    return [
        run_config(tiny_bert, tiny_glue, results, f"seed={s}", f"optim.lr={lr}", f"lora.r={r}", f"lora.alpha={a}",
                   "optim.epochs=2", "optim.save_every_steps=4", "optim.log_every=2", f"results_dir={results}",
                   "out_dir=${results_dir}/${run}", RUN, *extra)  # fmt: skip
        for s, lr, r, a in SWEEP
    ]


def folders(results: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(results.iterdir()) if p.is_dir()}


def assert_close_records(ours: list[dict], theirs: list[dict], what: str) -> None:
    assert [sorted(r) for r in ours] == [sorted(r) for r in theirs], what
    for a, b in zip(ours, theirs, strict=True):
        for key, value in b.items():
            np.testing.assert_allclose(a[key], value, atol=TOL, rtol=0, err_msg=f"{what}: {key}")


def test_a_packed_sweep_writes_what_separate_runs_write(tiny_bert, tiny_glue, tmp_path):
    from lora_jax.experiment import run, run_packed

    for cfg in configs(tiny_bert, tiny_glue, tmp_path / "separate"):
        run(cfg)
    summaries = run_packed(configs(tiny_bert, tiny_glue, tmp_path / "packed"))
    separate, packed = folders(tmp_path / "separate"), folders(tmp_path / "packed")
    assert list(packed) == list(separate) and len(packed) == len(SWEEP)
    for name, theirs in separate.items():
        ours = packed[name]
        assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
        a, b = (load_file(d / "adapter" / "adapter.safetensors") for d in (ours, theirs))
        assert sorted(a) == sorted(b)
        for key in b:  # LoRA A/B at the run's own rank, the scale, the trained head
            assert a[key].shape == b[key].shape, key
            np.testing.assert_allclose(a[key], b[key], atol=weight_atol(name), rtol=0, err_msg=f"{name} {key}")
        for stream in ("metrics", "train"):
            assert_close_records(read_jsonl(ours / f"{stream}.jsonl"), read_jsonl(theirs / f"{stream}.jsonl"), stream)
        mine, alone = (json.loads((d / "summary.json").read_text()) for d in (ours, theirs))
        assert set(mine) - set(alone) == {"packed_with"} and set(alone) <= set(mine)
        for key in ("best", "best_epoch", "steps", "trainable_params", "total_params", "run", "seed", "lora"):
            assert mine[key] == (alone[key] if key == "lora" else pytest.approx(alone[key], abs=TOL)), key
    assert sorted(s["run"] for s in summaries) == list(separate)
    trained = [load_file(d / "adapter" / "adapter.safetensors") for d in packed.values()]
    assert len({float(np.abs(t[k]).sum()) for t in trained for k in t if "lora_b" in k}) > 3  # runs really differ

    # A finished sweep run again resumes at its end and rewrites the same summaries (as a finished run does).
    again = run_packed(configs(tiny_bert, tiny_glue, tmp_path / "packed"))
    assert [s["history"] for s in again] == [s["history"] for s in summaries]


class Killed(Exception):
    """Stands for a kill -9 right after a checkpoint."""


def test_resuming_mid_sweep_and_refusals(tiny_bert, tiny_glue, tmp_path, monkeypatch):
    from lora_jax import runbook
    from lora_jax.experiment import run_packed

    with pytest.raises(ValueError, match=r"may vary only seed, optim.lr, lora.r, lora.alpha; .*'optim.batch_size'"):
        cfgs = configs(tiny_bert, tiny_glue, tmp_path / "a")
        cfgs[1].optim.batch_size = 4
        run_packed(cfgs)
    with pytest.raises(ValueError, match="share a folder"):
        run_packed(configs(tiny_bert, tiny_glue, tmp_path / "b", "run=same"))
    # Killed right after every run's periodic save at step 4: the sweep resumes there and ends where an
    # uninterrupted one does. (optim.max_steps=4 is no kill: it sets a 4-step lr schedule and evaluates at step 4.)
    whole = run_packed(configs(tiny_bert, tiny_glue, tmp_path / "whole", "optim.epochs=1"))
    save, saved = runbook.RunBook.save_latest, []

    def save_then_die(self, state, step):
        save(self, state, step)
        saved.append(step)
        if saved.count(4) == len(SWEEP):
            raise Killed

    with monkeypatch.context() as patch, pytest.raises(Killed):
        patch.setattr(runbook.RunBook, "save_latest", save_then_die)
        run_packed(configs(tiny_bert, tiny_glue, tmp_path / "cut", "optim.epochs=1"))
    for folder in folders(tmp_path / "cut").values():
        assert [p.name for p in (folder / "checkpoints" / "latest").iterdir() if p.name.isdigit()] == ["4"]
    resumed = run_packed(configs(tiny_bert, tiny_glue, tmp_path / "cut", "optim.epochs=1"))
    for a, b in zip(resumed, whole, strict=True):
        assert a["steps"] == b["steps"] == 6
        assert len(a["history"]) == len(b["history"]) == 1  # one eval, at step 6
        assert a["history"][-1] == pytest.approx(b["history"][-1], abs=TOL)  # step, epoch, metrics
    first = folders(tmp_path / "cut")
    name = next(iter(first))
    load = lambda d: load_file(d / "adapter" / "adapter.safetensors")  # noqa: E731
    for key, value in load(folders(tmp_path / "whole")[name]).items():
        np.testing.assert_allclose(load(first[name])[key], value, atol=TOL, rtol=0, err_msg=key)


def test_padded_rank_slots_stay_exactly_zero_with_dropout(tiny_bert):
    """The packed step on runs of ranks 2 and 5 (LoRA dropout on): padding gets no gradient and no update."""
    from lora_jax.models.hub import from_pretrained
    from lora_jax.objective import make_optimizer
    from lora_jax.train import TrainConfig, TrainState

    module, params, _, _ = from_pretrained(tiny_bert, task="sequence-classification", num_labels=2)
    runs = [LoraConfig(r=2, alpha=4, dropout=0.2, targets=("query", "value")),
            LoraConfig(r=5, alpha=5, dropout=0.2, targets=("query", "value"))]  # fmt: skip
    halves = [partition(w, trainable_mask(w, c)) for c in runs for w in [lora_wrap(params, c, jax.random.key(c.r))]]
    trainable, mask = sweep.stack_padded([t for t, _ in halves])
    owns, shared = sweep._split_frozen([f for _, f in halves], ["r2", "r5"])
    own, _ = sweep.stack_padded(owns)
    tx = make_optimizer(TrainConfig(lr=1.0, warmup_ratio=0.0), 10)
    opt_state, _ = sweep.stack_padded([tx.init(t) for t, _ in halves])
    step = jax.jit(sweep.packed_train_step(module, tx, 2))
    state = TrainState(trainable, opt_state, jnp.int32(0))
    rng = np.random.default_rng(0)
    for _ in range(3):
        ids = rng.integers(1000, 2000, (2, 4, 9))
        batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
                 "labels": rng.integers(0, 2, (2, 4)), "weights": np.ones((2, 4), np.float32)}  # fmt: skip
        state, losses = step(state, own, shared, batch, jnp.array([0, 1], jnp.uint32), jnp.array([0.05, 0.05]), mask)
    assert np.isfinite(np.asarray(losses)).all()
    flat_mask = dict(leaf_paths(mask))
    padded = 0
    for path, leaf in leaf_paths(state.trainable):
        pad = np.asarray(flat_mask[path]) == 0
        padded += int(pad.sum())
        assert not np.asarray(leaf)[pad].any(), path
        if "lora_b" in path:
            assert np.abs(np.asarray(leaf)[~pad]).max() > 0, path  # the real slots moved
    assert padded > 0


def test_step_groups_pack_at_the_widest_width_unless_dropout_must_match():
    """Default: one packed step per step, every run active at the widest bucket (slots counted at that width);
    by_width (exact_dropout with dropout on): one step per distinct width, each run active at its own."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 40, 32)
    mask = (np.arange(48)[None, :] < lengths[:, None]).astype(np.int32)
    data = {"input_ids": mask * 7, "attention_mask": mask, "labels": np.zeros(32, np.int32)}
    packed = next(sweep._step_groups(data, 4, [0, 1, 2], 0, 0, 1, by_width=False))
    exact = next(sweep._step_groups(data, 4, [0, 1, 2], 0, 0, 1, by_width=True))
    (groups, tokens), (exact_groups, exact_tokens) = packed, exact
    assert len(groups) == 1 and groups[0][0].all()
    width = groups[0][1]["input_ids"].shape[-1]
    assert all(slots == 4 * width for _, slots in tokens)
    assert [real for real, _ in tokens] == [real for real, _ in exact_tokens]
    widths = [b["input_ids"].shape[-1] for _, b in exact_groups]
    assert len(widths) > 1 and widths == sorted(set(widths)) and max(widths) == width
    assert np.sum([active for active, _ in exact_groups], axis=0).tolist() == [1, 1, 1]  # each run steps once


@pytest.mark.parametrize("method", ["adapter_h", "prefix_embed", "prefix_kv", "bitfit", "ft_top2", "full"])
def test_a_packed_baseline_sweep_writes_what_separate_runs_write(tiny_bert, tiny_glue, tmp_path, method):
    """The paper's baselines (and PEFT's prefix tuning) pack as LoRA does: their own trainable leaves (adapters,
    special tokens, key/value prefixes, biases) are stacked over one frozen base, and each folder ends as the run
    alone ends."""
    from lora_jax.experiment import run, run_packed

    def cfgs(results: Path) -> list:
        return [run_config(tiny_bert, tiny_glue, results, f"method={method}", "prefix.l_p=4", "prefix.l_i=0",
                           "adapter.r=4", f"seed={s}", f"optim.lr={lr}", "optim.epochs=1", f"results_dir={results}",
                           "out_dir=${results_dir}/${run}", "run=${method}_s${seed}_lr${optim.lr}",
                           *(["exports=[merged]"] if method == "full" else []))  # full FT: no adapter, a checkpoint
                for s, lr in (("0", "1e-2"), ("1", "5e-3"))]  # fmt: skip

    for cfg in cfgs(tmp_path / "separate"):
        run(cfg)
    summaries = run_packed(cfgs(tmp_path / "packed"))
    separate, packed = folders(tmp_path / "separate"), folders(tmp_path / "packed")
    assert list(packed) == list(separate) and len(packed) == 2
    for name, theirs in separate.items():
        ours = packed[name]
        assert_close_records(read_jsonl(ours / "metrics.jsonl"), read_jsonl(theirs / "metrics.jsonl"), "metrics")
        assert_close_records(read_jsonl(ours / "train.jsonl"), read_jsonl(theirs / "train.jsonl"), "train")
        files = sorted(p.relative_to(theirs) for p in theirs.glob("*/*.safetensors"))
        assert files and files == sorted(p.relative_to(ours) for p in ours.glob("*/*.safetensors"))
        for file in files:
            a, b = load_file(ours / file), load_file(theirs / file)
            assert sorted(a) == sorted(b)
            for key in b:
                np.testing.assert_allclose(a[key], b[key], atol=weight_atol(name), rtol=0, err_msg=f"{name} {key}")
    assert {s["method"] for s in summaries} == {method} and all(s["packed_with"] for s in summaries)
    first, second = (load_file(next(d.glob("*/*.safetensors"))) for d in packed.values())
    assert any(not np.array_equal(first[k], second[k]) for k in first)  # two seeds, two rates: the runs differ
