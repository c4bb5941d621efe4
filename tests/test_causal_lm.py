"""The trainer's causal-LM path (lora_jax.causal_lm) on tiny random GPT-2 and Llama decoders with the GPT-2 tokenizer:
completion-only labels, label smoothing as optax defines it, the padding the summary reports, training through the
shared loop (loss falls, a stopped run resumes to the same params), and beam-search evaluation writing its outputs,
samples and the five E2E metrics (real Java for METEOR)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lora_jax import causal_lm, runbook
from lora_jax.data import e2e
from lora_jax.data.nlg_metrics import METRICS
from lora_jax.logging import read_jsonl
from lora_jax.lora import lora_wrap
from lora_jax.models import hub
from lora_jax.objective import batch_loss, smoothed_cross_entropy
from lora_jax.train import TrainConfig, train
from lora_jax.tree import leaf_paths
from tests.test_e2e_data import tokenizer  # noqa: F401  (the GPT-2 tokenizer fixture; skips without it)

NAMES = ("Aromi", "Blue Spice", "Cotto", "Zizzi", "The Mill", "Alimentum", "Fitzbillies", "Wildwood")
TYPES = ("pub", "restaurant", "coffee shop")


def _write_e2e(folder: Path) -> Path:
    """A learnable E2E-format corpus: 24 training pairs, 4 test MRs with two references each."""
    folder.mkdir(parents=True, exist_ok=True)
    train_lines = [f"name : {n} | Type : {t}||{n} is a {t} ." for n in NAMES for t in TYPES]
    test_lines = [f"name : {n} | Type : pub||{ref}" for n in NAMES[:4] for ref in (f"{n} is a pub .", f"A pub , {n} .")]
    (folder / "train.txt").write_text("\n".join(train_lines) + "\n")
    (folder / "test.txt").write_text("\n".join(test_lines) + "\n")
    (folder / "valid.txt").write_text("\n".join(test_lines[:2]) + "\n")
    return folder


@pytest.fixture(scope="module")
def e2e_dir(tmp_path_factory) -> Path:
    return _write_e2e(tmp_path_factory.mktemp("e2e"))


@pytest.fixture(scope="module")
def decoders(tmp_path_factory, tokenizer):  # noqa: F811
    """Tiny random GPT-2 and Llama (GQA, tied embeddings) checkpoints that share the GPT-2 tokenizer."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    vocab = len(tokenizer)
    configs = {
        "gpt2": transformers.GPT2Config(vocab_size=vocab, n_positions=128, n_embd=16, n_layer=2, n_head=2),
        "llama": transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
        ),
    }  # fmt: skip
    folders = {}
    for kind, config in configs.items():
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(kind)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[kind] = folder
    return folders


def test_labels_are_the_next_completion_tokens_and_never_the_context(e2e_dir, tokenizer) -> None:  # noqa: F811
    split = e2e.load_e2e("train", e2e_dir)
    rows = causal_lm.causal_rows(split, tokenizer, 512)
    eos = tokenizer.eos_token_id
    for i, (mr, ref) in enumerate(zip(split.mrs, split.references, strict=True)):
        context = len(tokenizer(mr, add_special_tokens=False)["input_ids"]) + 1
        completion = tokenizer(" " + ref, add_special_tokens=False)["input_ids"] + [eos]
        labels = rows["labels"][i]
        labelled = np.flatnonzero(labels != causal_lm.IGNORE)
        # Position t predicts token t + 1: the context's last position (its eos) predicts the first reference token.
        np.testing.assert_array_equal(labelled, np.arange(context - 1, context - 1 + len(completion)))
        np.testing.assert_array_equal(labels[labelled], completion)
        np.testing.assert_array_equal(rows["input_ids"][i, labelled + 1], completion)
    assert rows["input_ids"].shape[1] == rows["attention_mask"].sum(axis=1).max()  # cropped to the longest row


def test_label_smoothing_is_optax_smooth_labels_and_skips_unlabelled_tokens() -> None:
    logits = jax.random.normal(jax.random.key(0), (3, 5, 11)) * 3
    labels = jax.random.randint(jax.random.key(1), (3, 5), 0, 11)
    smoothed = optax.softmax_cross_entropy(logits, optax.smooth_labels(jax.nn.one_hot(labels, 11), 0.1))
    np.testing.assert_allclose(smoothed_cross_entropy(logits, labels, 0.1), smoothed, rtol=1e-6, atol=1e-6)
    plain = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    np.testing.assert_allclose(smoothed_cross_entropy(logits, labels), plain, rtol=1e-6)
    masked = labels.at[:, :2].set(-100)
    weights = jnp.array([1.0, 1.0, 0.0])  # a filler row
    real = (masked != -100) * weights[:, None]
    expected = jnp.sum(smoothed * real) / jnp.sum(real)
    np.testing.assert_allclose(batch_loss(logits, masked, weights, 0, 0.1), expected, rtol=1e-6)


def _setup(folder: Path, e2e_dir: Path, method: str = "lora", targets=("q", "v")):
    module, params, tok, _ = hub.from_pretrained(folder, task="causal-lm")
    model_type = "gpt2" if "gpt2" in folder.name else "llama"
    lora = hub.lora_config(model_type, targets, r=4, alpha=32, dropout=0.1)
    if method == "lora":
        params = lora_wrap(params, lora, jax.random.key(0))
    decode = causal_lm.DecodeConfig(num_beams=2, max_new_tokens=8, samples=2)
    data = {"dir": str(e2e_dir), "max_len": 64, "bucket_step": 4}
    train_set, eval_sets, spec, buckets = causal_lm.e2e_datasets(data, decode, tok)
    return module, params, lora, train_set, eval_sets, spec, buckets


def _copy(params):
    """A fresh copy: `train` donates the params it is given."""
    return jax.tree.map(jnp.copy, params)


def _config(method: str = "lora", **kw) -> TrainConfig:
    base = dict(
        method=method,
        epochs=2,
        batch_size=4,
        eval_batch_size=4,
        lr=1e-2,
        warmup_steps=2,
        label_smoothing=0.1,
        weight_decay=0.01,
        log_every=1,
        save_every_steps=0,
        progress=False,
        exports=(),
    )
    return TrainConfig(**{**base, **kw})  # fmt: skip


@pytest.mark.slow
def test_gpt2_trains_through_the_shared_loop_evaluates_and_resumes(decoders, e2e_dir, tmp_path) -> None:
    module, params, lora, train_set, eval_sets, spec, buckets = _setup(decoders["gpt2"], e2e_dir)
    config = _config()
    summary = train(module, _copy(params), train_set, eval_sets, spec, config, tmp_path / "full", lora, buckets=buckets)

    losses = [r["loss"] for r in read_jsonl(tmp_path / "full" / "train.jsonl")]
    assert len(losses) == summary["steps"] == 12 and np.mean(losses[-3:]) < np.mean(losses[:3])
    lengths = train_set["attention_mask"].sum(axis=1)
    # Each epoch holds every row once, so its slots are real tokens / (1 - its padding fraction).
    slots = sum(lengths.sum() / (1 - e2e.padding_fraction(lengths, 4, buckets, epoch=k)) for k in (0, 1))
    expected = 1 - 2 * lengths.sum() / slots
    assert summary["padding_fraction"] == pytest.approx(expected)
    # Evaluation: every test MR decoded once per epoch, the five metrics logged, a few samples beside a reference.
    history = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    assert [h["epoch"] for h in history] == [0, 1] and all(set(METRICS) <= set(h) for h in history)
    assert summary["main_metric"] == "BLEU" and summary["best"] == max(h["BLEU"] for h in history)
    for epoch in (0, 1):
        lines = (tmp_path / "full" / "decoded" / f"test_epoch{epoch}.txt").read_text().splitlines()
        assert len(lines) == len(eval_sets["test"]["input_ids"]) == 4
    samples = read_jsonl(tmp_path / "full" / "samples.jsonl")
    assert len(samples) == 2 and [set(s) for s in samples[0]["samples"]] == [{"mr", "output", "reference"}] * 2
    assert causal_lm.keep_best_outputs(tmp_path / "full", "test", summary["best_epoch"]) == "test_outputs.txt"

    # Stopped after epoch 0 (as a killed run would be, minus the kill), then started again: the same params.
    stop = lambda epoch, main, record: True  # noqa: E731
    train(module, _copy(params), train_set, eval_sets, spec, config, tmp_path / "resumed", lora, on_epoch=stop,
          buckets=buckets)  # fmt: skip
    resumed = train(module, _copy(params), train_set, eval_sets, spec, config, tmp_path / "resumed", lora,
                    buckets=buckets)  # fmt: skip
    assert resumed["steps"] == 12 and [h["epoch"] for h in resumed["history"]] == [0, 1]
    np.testing.assert_allclose([r["loss"] for r in read_jsonl(tmp_path / "resumed" / "train.jsonl")], losses, rtol=1e-5)


@pytest.mark.slow
def test_a_run_killed_during_its_beam_search_eval_resumes_the_decode(decoders, e2e_dir, tmp_path, monkeypatch) -> None:
    module, params, lora, train_set, eval_sets, spec, buckets = _setup(decoders["gpt2"], e2e_dir)
    config = _config(epochs=1, eval_batch_size=2)  # 4 test MRs: 2 decoded batches
    straight = train(module, _copy(params), train_set, eval_sets, spec, config, tmp_path / "straight", lora,
                     buckets=buckets)  # fmt: skip
    assert not (tmp_path / "straight" / runbook.EVAL_BATCHES).exists()  # removed once the epoch is saved

    to_host, fetched = runbook._to_host, []

    def killed_on_the_second_batch(x):
        if len(fetched) == 1:
            raise KeyboardInterrupt("killed")
        fetched.append(1)
        return to_host(x)

    monkeypatch.setattr(runbook, "_to_host", killed_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        train(module, _copy(params), train_set, eval_sets, spec, config, tmp_path / "run", lora, buckets=buckets)
    kept = list((tmp_path / "run" / runbook.EVAL_BATCHES).glob("*/*.npy"))
    assert [k.name for k in kept] == ["00000.npy"]

    fetched.clear()
    monkeypatch.setattr(runbook, "_to_host", lambda x: fetched.append(1) or to_host(x))
    resumed = train(module, _copy(params), train_set, eval_sets, spec, config, tmp_path / "run", lora,
                    buckets=buckets)  # fmt: skip
    assert len(fetched) == 1  # the same params (same step, same digest): only the second batch was decoded
    assert resumed["history"] == straight["history"]
    assert (tmp_path / "run" / "decoded" / "test_epoch0.txt").read_text() == (
        tmp_path / "straight" / "decoded" / "test_epoch0.txt"
    ).read_text()
    assert not (tmp_path / "run" / runbook.EVAL_BATCHES).exists()


@pytest.mark.slow
@pytest.mark.parametrize(("method", "targets"), [("lora", ("q", "v")), ("full", ("q", "v"))])
def test_llama_lora_on_q_proj_v_proj_and_full_ft_train(decoders, e2e_dir, tmp_path, method, targets) -> None:
    module, params, lora, train_set, eval_sets, spec, buckets = _setup(decoders["llama"], e2e_dir, method, targets)
    if method == "lora":
        adapted = {p.rsplit(".", 2)[-2] for p, _ in leaf_paths(params) if p.rsplit(".", 1)[-1].startswith("lora_")}
        assert adapted == {"q_proj", "v_proj"}
    config = _config(method, epochs=1, lr=1e-2 if method == "lora" else 3e-3)
    summary = train(module, _copy(params), train_set, eval_sets, spec, config, tmp_path / method, lora, buckets=buckets)
    losses = [r["loss"] for r in read_jsonl(tmp_path / method / "train.jsonl")]
    assert np.mean(losses[-2:]) < np.mean(losses[:2])
    if method == "full":
        assert summary["trainable_params"] == sum(int(np.size(x)) for _, x in leaf_paths(params))
    else:  # 2 layers x (q_proj 16 -> 16, v_proj 16 -> 2 kv heads x 4), r = 4
        assert summary["trainable_params"] == 2 * (4 * (16 + 16) + 4 * (16 + 8))


def test_prefix_layer_reads_its_special_tokens_in_training_rows_and_prompts(decoders, e2e_dir) -> None:
    """PreLayer on a causal LM: the data side puts the special tokens into the rows and the prompts, so its leaves
    get gradients (before, the E2E path left them out: zero gradients, PreLayer trained nothing)."""
    from lora_jax.data.prefix import SpecialTokens
    from lora_jax.methods import partition, trainable_mask
    from lora_jax.objective import make_loss
    from lora_jax.prefix import PrefixConfig, prefix_wrap

    module, params, tok, _ = hub.from_pretrained(decoders["llama"], task="causal-lm")
    params = prefix_wrap(params, module, PrefixConfig(l_p=3, l_i=2), jax.random.key(0), "prefix_layer")
    special = SpecialTokens(module.config.vocab_size, 3, 2)
    decode = causal_lm.DecodeConfig(num_beams=2, max_new_tokens=8, samples=2)
    data = {"dir": str(e2e_dir), "max_len": 64, "bucket_step": 4}
    with_special, eval_sets, _, _ = causal_lm.e2e_datasets(data, decode, tok, special)
    for rows in (with_special, eval_sets["test"]):
        assert (rows["input_ids"][:, :3] == special.prefix_ids).all()  # every row starts with the prefix
        assert ((rows["input_ids"] >= special.vocab_size).sum(axis=1) == 5).all()  # and holds the infix once
    assert (with_special["labels"][:, :3] == -100).all()

    trainable, frozen = partition(params, trainable_mask(params, method="prefix_layer"))
    loss = make_loss(module, num_labels=0)
    plain, _, _, _ = causal_lm.e2e_datasets(data, decode, tok)
    for rows, reads in ((with_special, True), (plain, False)):
        batch = {k: jnp.asarray(v[:4]) for k, v in rows.items()} | {"weights": jnp.ones(4)}
        grads = jax.grad(loss)(trainable, frozen, batch, jax.random.key(1))
        norms = [float(jnp.abs(g).sum()) for _, g in leaf_paths(grads)]
        assert len(norms) == 2 * module.config.num_hidden_layers  # prefix + infix: the embedding, layers 1 .. L-1
        assert all(n > 0 for n in norms) if reads else all(n == 0 for n in norms)


def test_decode_config_rejects_bad_values_in_one_line() -> None:
    with pytest.raises(ValueError, match="generate.split must be one of"):
        causal_lm.DecodeConfig(split="dev")
    with pytest.raises(ValueError, match=r"generate.max_mrs must be >= 1 \(or null: every MR\)"):
        causal_lm.DecodeConfig(max_mrs=0)


def test_fewshot_prompt_and_its_stop_tokens(tokenizer) -> None:  # noqa: F811
    prompt = causal_lm.fewshot_prompt([("name : A", "A is here .")], "name : B")
    assert prompt.endswith("name : A\nSentence: A is here .\n\nname : B\nSentence:")
    stops = causal_lm.newline_tokens(tokenizer)
    assert tokenizer("\n", add_special_tokens=False)["input_ids"][0] in stops
    assert all(set(tokenizer.decode([t])) == {"\n"} for t in stops)


def test_fewshot_decodes_every_mr_scores_them_and_resumes(decoders, e2e_dir, tmp_path, monkeypatch) -> None:
    module, params, tokenizer, _ = hub.from_pretrained(str(decoders["gpt2"]), task="causal-lm")  # noqa: F811
    decode = causal_lm.DecodeConfig(num_beams=2, max_new_tokens=4, shots=2, samples=2)
    scores = causal_lm.fewshot(module, params, tokenizer, str(e2e_dir), decode, tmp_path, batch_size=3)
    assert set(METRICS) <= set(scores) and len(scores["decoded"]) == 4  # the 4 test MRs, once each
    assert (tmp_path / "test_outputs.txt").read_text().count("\n") == 4
    assert sorted(p.name for p in (tmp_path / "batches").iterdir()) == ["00000.npy", "00001.npy"]
    monkeypatch.setattr(causal_lm.decoding, "generate", lambda *a, **k: pytest.fail("a rerun reuses kept batches"))
    again = causal_lm.fewshot(module, params, tokenizer, str(e2e_dir), decode, tmp_path, batch_size=3)
    assert again["decoded"] == scores["decoded"]


def test_a_subset_is_the_same_rows_for_every_run(e2e_dir) -> None:
    split = e2e.load_e2e("train", e2e_dir)
    a, b = causal_lm.train_subset(split, 10, seed=0), causal_lm.train_subset(split, 10, seed=0)
    assert a == b and len(a) == 10 and set(a.mrs) <= set(split.mrs)
    assert causal_lm.train_subset(split, None) is split
    with pytest.raises(ValueError, match="data.train_examples must be >= 1"):
        causal_lm.train_subset(split, 0)
