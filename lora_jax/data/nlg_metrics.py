"""The E2E NLG Challenge's five metrics, computed as its official scorer computes them.

The scorer is tuetschek/e2e-metrics (`measure_scores.py`); the LoRA paper's Table 3 numbers come from it. Every
metric is corpus-level and multi-reference: `hypotheses[i]` is scored against all of `references[i]` (the human
references of one meaning representation). Scores are on the scorer's own scales (BLEU, METEOR, ROUGE-L in 0..1;
the paper prints BLEU, METEOR and ROUGE-L x100, NIST and CIDEr as they are).

    BLEU     sacrebleu: mteval-v13a tokenisation, lowercased (the scorer's BLEU is case-insensitive), corpus
             n-gram counts up to 4, brevity penalty from the closest reference length (the shorter one on a tie).
    NIST     `nist` below, on the same tokens: no library computes mteval's multi-reference NIST (see there).
    METEOR   pycocoevalcap's wrapper of the METEOR 1.5 jar (`-l en -norm`), statistics aggregated over the corpus.
    ROUGE-L  pycocoevalcap (LCS F-measure with beta 1.2, best precision and recall over the references, averaged).
    CIDEr    pycocoevalcap's CIDEr-D (n = 1..4, sigma 6, x10); document frequencies come from the references
             passed in, so a corpus of one item scores 0.

METEOR, ROUGE-L and CIDEr see the text as the scorer feeds it to the MS-COCO caption code: tokenised by the
Stanford PTB tokenizer (pycocoevalcap's CoreNLP 3.4.1 jar, lowercased, punctuation tokens dropped). METEOR and
that tokenizer run on Java; without it they raise `JavaNotFoundError`, never a silent zero. (pycocoevalcap's
tokenizer writes its input to a temporary file beside its jar, so its package folder must be writable.)
"""

from __future__ import annotations

import functools
import math
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

JAVA_INSTALL_HINT = "install a Java runtime (e.g. `apt-get install openjdk-17-jre-headless`) so that `java` is on PATH"
METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")

References = Sequence[Sequence[str]]


class JavaNotFoundError(RuntimeError):
    """METEOR 1.5 and the PTB tokenizer need `java`; the message says what to install."""


def e2e_metrics(hypotheses: Sequence[str], references: References) -> dict[str, float]:
    """All five scores, keyed as the official scorer prints them (BLEU, NIST, METEOR, ROUGE_L, CIDEr)."""
    _check(hypotheses, references)
    scores = {"BLEU": bleu(hypotheses, references), "NIST": nist(hypotheses, references)}
    scores.update(coco_metrics(hypotheses, references))
    return {name: scores[name] for name in METRICS}


# ---------------------------------------------------------------------------------------------------------------
# BLEU and NIST (mteval-v13a tokens)
# ---------------------------------------------------------------------------------------------------------------


def bleu(hypotheses: Sequence[str], references: References) -> float:
    """Corpus BLEU in 0..1, case-insensitive, as mteval-v13a (the scorer's BLEU)."""
    import sacrebleu

    _check(hypotheses, references)
    score = sacrebleu.corpus_bleu(list(hypotheses), _reference_streams(references), **BLEU_SETTINGS)
    return score.score / 100.0


BLEU_SETTINGS = {"lowercase": True, "tokenize": "13a", "smooth_method": "none"}


def _reference_streams(references: References) -> list[list[str | None]]:
    """sacrebleu takes one stream per reference slot; None marks a missing reference (variable counts per item)."""
    most = max(len(group) for group in references)
    return [[group[k] if k < len(group) else None for group in references] for k in range(most)]


def bleu_paired_bootstrap(
    systems: Sequence[tuple[str, Sequence[str]]], references: References, n_samples: int = 1000
) -> dict[str, dict[str, float | None]]:
    """Each system's BLEU (0..100) with a 95% interval from resampling the items with replacement, and the paired
    bootstrap p-value of each against the first system (Koehn 2004; sacrebleu's `--paired-bs`, seed 12345 unless
    SACREBLEU_SEED says otherwise). One run's few hundred test items leave BLEU intervals of several points, so two
    methods' rows differ only where this says so."""
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import PairedTest

    for _, hypotheses in systems:
        _check(hypotheses, references)
    metric = BLEU(**BLEU_SETTINGS, force=True)  # force: E2E text ends in " ." (its own style), which sacrebleu warns on
    test = PairedTest([(name, list(h)) for name, h in systems], {"BLEU": metric}, _reference_streams(references),
                      test_type="bs", n_samples=n_samples)  # fmt: skip
    _, scores = test()
    number = lambda x: None if x is None else float(x)  # noqa: E731  (numpy scalars out)
    return {name: {"bleu": r.score, "mean": number(r.mean), "ci95": number(r.ci), "p_value": number(r.p_value)}
            for name, r in zip(scores["System"], scores["BLEU"], strict=True)}  # fmt: skip


def mteval_tokens(text: str) -> list[str]:
    """mteval-v13a's tokens of a lowercased text (sacrebleu's '13a' tokenizer)."""
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()(text.lower()).split()


NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2  # length penalty 0.5 when the output is 2/3 of the references


def nist(hypotheses: Sequence[str], references: References, max_n: int = 5) -> float:
    """Corpus NIST (Doddington 2002) as mteval-v13a and the scorer compute it, on lowercased 13a tokens.

    Why not a library: nltk's `corpus_nist` scores each hypothesis against its single best reference and takes
    that reference's length, where mteval clips each n-gram by its largest count over *all* references and
    takes the *average* reference length (on the scorer's own example nltk gives 6.22, the scorer 7.7889).
    sacrebleu has no NIST. So the few lines of the definition are here:

        info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn)), counts over every reference of the corpus
                       (count of the empty n-gram = all reference words)
        NIST = sum_n [sum of info over matched hypothesis n-grams / number of hypothesis n-grams]
               * exp(-beta * log(min(1, hypothesis words / average reference words))^2)
    """
    _check(hypotheses, references)
    hyps = [mteval_tokens(h) for h in hypotheses]
    refs = [[mteval_tokens(r) for r in group] for group in references]
    ref_counts: Counter[tuple[str, ...]] = Counter()
    for group in refs:
        for ref in group:
            ref_counts[()] += len(ref)
            for n in range(1, max_n + 1):
                ref_counts.update(_ngrams(ref, n))

    gained, counted = [0.0] * max_n, [0] * max_n
    sys_len, ref_len = 0, 0.0
    for hyp, group in zip(hyps, refs, strict=True):
        sys_len += len(hyp)
        ref_len += sum(len(ref) for ref in group) / len(group)
        for n in range(1, max_n + 1):
            clip: Counter[tuple[str, ...]] = Counter()
            for ref in group:
                clip |= _ngrams(ref, n)  # | keeps the largest count of each n-gram
            for gram, count in _ngrams(hyp, n).items():
                if clip[gram]:
                    gained[n - 1] += min(count, clip[gram]) * math.log2(ref_counts[gram[:-1]] / ref_counts[gram])
            counted[n - 1] += max(len(hyp) - n + 1, 0)
    score = sum(g / c for g, c in zip(gained, counted, strict=True) if c)
    ratio = sys_len / ref_len if ref_len else 0.0
    if ratio <= 0:
        return 0.0
    return score * math.exp(-NIST_BETA * math.log(min(ratio, 1.0)) ** 2)


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


# ---------------------------------------------------------------------------------------------------------------
# METEOR, ROUGE-L, CIDEr (the MS-COCO caption code on PTB tokens)
# ---------------------------------------------------------------------------------------------------------------


def coco_metrics(
    hypotheses: Sequence[str], references: References, names: Sequence[str] = ("METEOR", "ROUGE_L", "CIDEr")
) -> dict[str, float]:
    """METEOR, ROUGE_L and CIDEr (any subset), tokenised once by the PTB tokenizer as the scorer does."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    _check(hypotheses, references)
    unknown = sorted(set(names) - {"METEOR", "ROUGE_L", "CIDEr"})
    if unknown:
        raise ValueError(f"unknown COCO metric(s) {unknown}; pick from METEOR, ROUGE_L, CIDEr.")
    gts, res = ptb_tokenize(hypotheses, references)
    scores = {}
    for name in names:
        if name == "METEOR":
            scores[name] = _meteor(gts, res)
        else:
            scorer = Rouge() if name == "ROUGE_L" else Cider()
            scores[name] = float(scorer.compute_score(gts, res)[0])
    return scores


def meteor(hypotheses: Sequence[str], references: References) -> float:
    return coco_metrics(hypotheses, references, ("METEOR",))["METEOR"]


def rouge_l(hypotheses: Sequence[str], references: References) -> float:
    return coco_metrics(hypotheses, references, ("ROUGE_L",))["ROUGE_L"]


def cider(hypotheses: Sequence[str], references: References) -> float:
    return coco_metrics(hypotheses, references, ("CIDEr",))["CIDEr"]


def ptb_tokenize(
    hypotheses: Sequence[str], references: References
) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """({item: tokenised references}, {item: [tokenised hypothesis]}) in the caption code's layout."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    require_java()
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r} for r in group] for i, group in enumerate(references)})
    res = tokenizer.tokenize({i: [{"caption": h}] for i, h in enumerate(hypotheses)})
    if len(gts) != len(references) or len(res) != len(hypotheses):
        raise RuntimeError("the PTB tokenizer returned fewer lines than it was given; check the Java install.")
    return gts, res


def _meteor(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    require_java()
    scorer = _meteor_process()
    try:
        return float(scorer.compute_score(gts, res)[0])
    except ValueError as err:  # the jar printed no number: it failed to start or ran out of memory
        _meteor_process.cache_clear()
        scorer.meteor_p.kill()
        detail = scorer.meteor_p.stderr.read().decode(errors="replace").strip().splitlines()[-1:]
        raise RuntimeError(f"METEOR's Java process gave no score ({'; '.join(detail) or err}).") from err


@functools.lru_cache(maxsize=1)
def _meteor_process():
    """One METEOR jar per Python process: loading its paraphrase table takes seconds, scoring a corpus does not."""
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def require_java() -> str:
    """The path of `java`, or a JavaNotFoundError that says what to install."""
    java = shutil.which("java")
    if java is None:
        raise JavaNotFoundError(f"METEOR 1.5 and the PTB tokenizer need Java, not found on PATH: {JAVA_INSTALL_HINT}.")
    return java


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------


def read_multi_reference_file(path: str | Path) -> list[list[str]]:
    """The scorer's plain-text reference format: one reference per line, items separated by empty lines."""
    groups: list[list[str]] = [[]]
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            groups[-1].append(line)
        elif groups[-1]:
            groups.append([])
    return [g for g in groups if g]


def read_lines(path: str | Path) -> list[str]:
    """One system output per line (the scorer's plain-text output format)."""
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]


def _check(hypotheses: Sequence[str], references: References) -> None:
    if isinstance(hypotheses, str) or any(isinstance(group, str) for group in references):
        raise TypeError("pass a list of hypotheses and, per hypothesis, a list of reference strings.")
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference groups; give one group each.")
    if not hypotheses:
        raise ValueError("no hypotheses to score.")
    empty = [i for i, group in enumerate(references) if not group]
    if empty:
        raise ValueError(f"items {empty[:5]} have no reference; every hypothesis needs at least one.")
