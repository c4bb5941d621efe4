"""The E2E metrics against the official scorer's own example, published library examples and known maxima."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from lora_jax.data import nlg_metrics as m

EXAMPLE = Path(os.environ.get("LORA_JAX_E2E_DIR", Path(__file__).resolve().parents[2] / "shared/data/e2e"))
EXAMPLE = EXAMPLE / "scorer_example"


def _scorer_example() -> tuple[list[str], list[list[str]], dict[str, float]]:
    if not (EXAMPLE / "expected_scores.json").is_file():
        pytest.skip(f"no official scorer example at {EXAMPLE}")
    expected = json.loads((EXAMPLE / "expected_scores.json").read_text())
    refs = m.read_multi_reference_file(EXAMPLE / "devel-conc.txt")
    hyps = m.read_lines(EXAMPLE / "baseline-output.txt")
    assert len(refs) == len(hyps) == 10
    return hyps, refs, {k: v for k, v in expected.items() if k in m.METRICS}


def test_bleu_and_nist_reproduce_the_official_scorer_example() -> None:
    hyps, refs, expected = _scorer_example()
    # The scorer prints 4 decimals: agreement to that precision means |ours - printed| <= 5e-5.
    assert abs(m.bleu(hyps, refs) - expected["BLEU"]) <= 5e-5
    assert abs(m.nist(hyps, refs) - expected["NIST"]) <= 5e-5


@pytest.mark.slow
def test_all_five_reproduce_the_official_scorer_example() -> None:
    hyps, refs, expected = _scorer_example()
    scores = m.e2e_metrics(hyps, refs)
    print({k: round(v, 4) for k, v in scores.items()})
    assert list(scores) == list(m.METRICS)
    for name in m.METRICS:
        assert abs(scores[name] - expected[name]) <= 5e-5, name


def test_bleu_reproduces_sacrebleus_published_example() -> None:
    # sacrebleu's README: corpus_bleu(sys, refs) = 48.53 (two reference streams). Case does not matter here.
    streams = [
        ["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
        ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."],
    ]
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    assert round(100 * m.bleu(hyps, [list(g) for g in zip(*streams, strict=True)]), 2) == 48.53


def test_bleu_is_case_insensitive_and_takes_the_shorter_reference_on_a_length_tie() -> None:
    refs = [["The cat sat on the mat .", "a cat was sitting on the mat in the house ."]]
    assert m.bleu(["THE CAT SAT ON THE MAT ."], refs) == pytest.approx(1.0)
    # 9 tokens, every n-gram in the 11-token reference; the 7- and 11-token references are equally close, so
    # mteval takes the shorter one and there is no brevity penalty (the longer would give exp(1 - 11/9) = 0.80).
    assert m.bleu(["a b c d e f g h i"], [["a b c d e f g", "a b c d e f g h i j k"]]) == pytest.approx(1.0)


def test_nist_equals_nltk_with_one_reference_per_item() -> None:
    # With a single reference, mteval's clipping and average length are nltk's best-reference rules.
    from nltk.translate.nist_score import corpus_nist

    rng = np.random.default_rng(0)
    words = "the a cat dog sat ran on under mat rug big small red".split()
    for _ in range(5):
        hyps = [" ".join(rng.choice(words, rng.integers(1, 12))) for _ in range(6)]
        refs = [[" ".join(rng.choice(words, rng.integers(3, 12)))] for _ in range(6)]
        ours = m.nist(hyps, refs)
        theirs = corpus_nist([[r[0].split()] for r in refs], [h.split() for h in hyps], 5)
        assert ours == pytest.approx(theirs, rel=1e-12)


def test_nist_uses_every_reference_unlike_nltk() -> None:
    # The second reference holds the hypothesis' last word: mteval credits it, nltk's best single reference not.
    from nltk.translate.nist_score import corpus_nist

    hyps = ["the cat sat on the mat", "a dog ran"]
    refs = [["the cat sat on a mat", "cats sit on mats"], ["a dog ran far", "one dog ran"]]
    ours = m.nist(hyps, refs)
    theirs = corpus_nist([[r.split() for r in g] for g in refs], [h.split() for h in hyps], 5)
    assert ours > 0 and ours != pytest.approx(theirs)


@pytest.mark.slow
def test_identical_hypotheses_get_the_maxima() -> None:
    refs = [["the cat sat on the mat today ."], ["a dog ran under the big red rug ."]]
    hyps = [group[0] for group in refs]
    scores = m.e2e_metrics(hyps, refs)
    assert scores["BLEU"] == pytest.approx(1.0)
    assert scores["METEOR"] == pytest.approx(1.0)
    assert scores["ROUGE_L"] == pytest.approx(1.0)
    assert scores["CIDEr"] == pytest.approx(10.0)  # CIDEr-D's x10 scale
    # The corpus scores average per-item ones: an empty output for one item halves ROUGE-L and CIDEr.
    half = m.coco_metrics(["", hyps[1]], refs, ("ROUGE_L", "CIDEr"))
    assert half == pytest.approx({"ROUGE_L": 0.5, "CIDEr": 5.0})


@pytest.mark.slow
def test_rouge_l_reproduces_lins_example() -> None:
    # Lin (2004), Sec. 3.1: against "police killed the gunman", S2 "police kill the gunman" has LCS 3 (0.75)
    # and S3 "the gunman kill police" LCS 2 (0.5); with P = R the F-measure is that ratio for any beta.
    refs = [["police killed the gunman"]]
    assert m.rouge_l(["police kill the gunman"], refs) == pytest.approx(0.75)
    assert m.rouge_l(["the gunman kill police"], refs) == pytest.approx(0.5)


def test_missing_java_is_a_one_line_error_naming_the_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no java anywhere on PATH
    hyps, refs = ["a dog ran under the big red rug"], [["a dog ran under the big red rug today"]]
    for scorer in (m.meteor, m.rouge_l, m.cider, m.e2e_metrics):
        with pytest.raises(m.JavaNotFoundError) as err:
            scorer(hyps, refs)
        message = str(err.value)
        assert "\n" not in message and "apt-get install openjdk-17-jre-headless" in message
    assert m.bleu(hyps, refs) > 0 and m.nist(hyps, refs) > 0  # the mteval metrics need no Java


def test_bad_inputs_say_what_to_pass() -> None:
    with pytest.raises(ValueError, match="2 hypotheses but 1 reference groups"):
        m.bleu(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match=r"items \[1\] have no reference"):
        m.nist(["a", "b"], [["a"], []])
    with pytest.raises(TypeError, match="list of reference strings"):
        m.bleu(["a"], ["a"])


def test_paired_bootstrap_separates_a_worse_system_and_not_a_one_line_change(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SACREBLEU_SEED", "12345")
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(50)]
    refs = [[" ".join(rng.choice(words, 12)) for _ in range(1 + i % 4)] for i in range(40)]  # 1-4 references each
    good = [" ".join(g[0].split()[:10] + list(rng.choice(words, 2))) for g in refs]  # 10 of 12 words kept
    worse = [" ".join(g.split()[:6] + list(rng.choice(words, 6))) for g in good]  # 6 kept
    almost = [*good[:-1], worse[-1]]  # one line of 40 differs
    scores = m.bleu_paired_bootstrap([("good", good), ("worse", worse), ("almost", almost)], refs, n_samples=200)
    assert scores["good"]["bleu"] == pytest.approx(100 * m.bleu(good, refs)) and scores["good"]["p_value"] is None
    assert scores["worse"]["bleu"] < scores["good"]["bleu"] and scores["worse"]["p_value"] < 0.01
    assert scores["almost"]["p_value"] > 0.05  # what one line of 40 changes is not told from the draw of lines
    assert scores["worse"]["ci95"] > 0  # 40 items of different difficulty: BLEU moves with the draw
    with pytest.raises(ValueError):
        m.bleu_paired_bootstrap([("short", good[:-1])], refs)
