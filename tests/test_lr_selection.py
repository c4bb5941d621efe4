"""experiments/lr_selection.py and tuned_table.py on fake run folders: the best epoch per grid point, the selected
lr per setting, the under-training flag, runs still training never selected, and the seeds at the selected rate
with their computed verdict."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import lr_selection  # noqa: E402
import tuned_table  # noqa: E402
from lr_selection import lr_selection_table, read_grid, selected  # noqa: E402
from tuned_table import tuned_section  # noqa: E402


@pytest.fixture(autouse=True)
def four_epoch_protocol(monkeypatch):
    """The fake runs below train 4 epochs: make that the protocol's schedule (runs with other epochs are rows of
    their own)."""
    monkeypatch.setattr(lr_selection, "EPOCHS", 4)


def fake_point(results: Path, task: str, method: str, lr: float, scores: list[float], finished: bool = True,
               seed: int = 0, alpha: float = 8, trainable: int = 0, peft: bool = False, extra: dict | None = None,
               name: str | None = None):  # fmt: skip
    name = name or f"{'peft_' if peft else ''}{method}_a{alpha:g}_seed{seed}_lr{lr:g}"
    folder = results / "glue_minilm_lrsel" / task / name
    folder.mkdir(parents=True)
    cfg = {"task": task, "method": method, "seed": seed, "optim": {"lr": lr, "epochs": 4}}
    if method == "lora":
        cfg["lora"] = {"r": 8, "alpha": alpha, "targets": ["q", "v"]}
    cfg.update(extra or {})
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    metric = "pearson" if task == "stsb" else "accuracy"
    rows = [{"epoch": e, metric: s} for e, s in enumerate(scores)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        summary = {"main_metric": metric, "best": max(scores), "trainable_params": trainable, "seed": seed,
                   "method": method, "task": task, "run": name, "exp": "glue_minilm_lrsel"}  # fmt: skip
        (folder / "summary.json").write_text(json.dumps(summary))


def test_selection_picks_the_best_finished_point_and_flags_a_last_epoch_best(tmp_path):
    fake_point(tmp_path, "mrpc", "lora", 5e-4, [0.70, 0.75, 0.76, 0.77])  # best at the last epoch
    fake_point(tmp_path, "mrpc", "lora", 1e-3, [0.72, 0.80, 0.79, 0.78])
    fake_point(tmp_path, "mrpc", "lora", 2e-3, [0.81, 0.90], finished=False)  # better, but still training
    fake_point(tmp_path, "stsb", "full", 2e-5, [0.85, 0.87, 0.86, 0.86])
    fake_point(tmp_path, "stsb", "full", 5e-5, [0.80, 0.85, 0.862, 0.864])  # last, but a plateau (+0.2 points)

    points = read_grid(tmp_path)
    chosen = selected(points)
    assert chosen[("mrpc", "lora")].lr == 1e-3 and chosen[("mrpc", "lora")].best_epoch == 1
    assert chosen[("stsb", "full")].best == 0.87

    table = lr_selection_table(tmp_path, tmp_path / "tables")
    rows = [line for line in table.splitlines() if line.startswith("| MRPC")]
    assert "77.0 | 4 ⚠ / 4 | finished" in rows[0]
    assert "**80.0** | 2 / 4 | finished" in rows[1]
    assert "90.0 | 2 / 2 | training (2/4 epochs)" in rows[2] and "**" not in rows[2]
    assert "86.4 | 4 ≈ / 4 | finished" in table  # within PLATEAU of epoch 3: not flagged as under-trained
    assert (
        "MRPC LoRA r=8 α=8 W_q,W_v lr 0.001 (80.0), provisional: 1 still training; STS-B full FT lr 2e-05 (87.0)."
    ) in table


def test_seeds_at_the_selected_rate_and_the_computed_verdict(tmp_path):
    for lr, best in ((2e-5, 0.80), (5e-5, 0.82), (1e-4, 0.79)):
        fake_point(tmp_path, "mrpc", "full", lr, [0.7, best, 0.75, 0.74])
    for lr, best in ((5e-4, 0.76), (1e-3, 0.78), (2e-3, 0.81), (4e-3, 0.70)):
        fake_point(tmp_path, "mrpc", "lora", lr, [0.7, 0.72, best, 0.77])
    fake_point(tmp_path, "mrpc", "full", 5e-5, [0.7, 0.84, 0.8, 0.8], seed=1)
    fake_point(tmp_path, "mrpc", "full", 5e-5, [0.7, 0.83, 0.8, 0.8], seed=2)
    fake_point(tmp_path, "mrpc", "lora", 2e-3, [0.7, 0.75, 0.78, 0.79], seed=1)  # best at the last epoch
    fake_point(tmp_path, "mrpc", "lora", 2e-3, [0.7, 0.99, 0.8, 0.8], seed=2, finished=False)  # never a seed
    fake_point(tmp_path, "mrpc", "lora", 1e-3, [0.99, 0.8, 0.8, 0.8], seed=1)  # another lr: not a seed
    fake_point(tmp_path, "mrpc", "lora", 2e-3, [0.7, 0.8, 0.85, 0.8], alpha=16)  # a variant row: never selects
    longer = {"optim": {"lr": 2e-3, "epochs": 8}}  # the grid setting on a longer schedule: a row, never a grid point
    fake_point(tmp_path, "mrpc", "lora", 2e-3, [0.7, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.82], extra=longer, name="long")
    fake_point(tmp_path, "rte", "full", 2e-5, [0.55, 0.60, 0.58, 0.57])
    fake_point(tmp_path, "rte", "lora", 1e-3, [0.55, 0.58, 0.59, 0.61])

    chosen = selected(read_grid(tmp_path))
    assert chosen[("mrpc", "lora")].lr == 2e-3 and chosen[("mrpc", "lora")].seed == 0
    lines = tuned_section(tmp_path, tmp_path / "tables")
    rows = {line.split(" | ")[0]: line for line in lines if line.startswith("| ")}
    assert "83.0 <sub>n=3 82.0–84.0, best ep 2,2,2 " in rows["| FT (tuned)"]
    assert "80.0 <sub>n=2 79.0–81.0, best ep 3,4⚠ " in rows["| LoRA r=8 α=8 q,v (tuned lr)"]
    assert "85.0 <sub>n=1, best ep 3 " in rows["| LoRA r=8 α=16 q,v (tuned lr)"]
    mrpc = next(line for line in lines if line.startswith("- MRPC"))
    assert (
        "**no** — gap -3.0; 12 of 408 dev rows (LoRA 80.0, n=2, range 79.0–81.0; FT 83.0, n=3, range 82.0–84.0)" in mrpc
    )
    assert "provisional: 2 seed(s), not 3" in mrpc
    why = next(line for line in lines if line.startswith("- Why LoRA trails on MRPC (FT 83.0)"))
    assert "under-training: 1 of 2 LoRA seeds peak at the last of 4 epochs (best epochs 3,4⚠)" in why
    assert (
        "(best epochs 3,4⚠); LoRA r=8 α=8 q,v, 8 epochs 82.0 (n=1, FT 82.0 on the same seeds: closes it); "
        "capacity: LoRA r=8 α=16"
    ) in why  # seed 0's FT, not the 3-seed median 83.0
    assert "82.0 <sub>n=1, best ep 8⚠ " in rows["| LoRA r=8 α=8 q,v, 8 epochs (tuned lr)"]
    assert not any(line.startswith("- Why LoRA trails on RTE") for line in lines)  # RTE's LoRA is ahead
    rte = next(line for line in lines if line.startswith("- RTE"))
    assert "**yes** — gap +1.0; 3 of 277 dev rows" in rte and "learning-rate grid unfinished" in rte
    sentence = next(line for line in lines if line.startswith("Under the tuned protocol"))
    assert sentence.startswith(
        "Under the tuned protocol the paper's claim (LoRA matches full fine-tuning) holds on "
        "RTE +1.0* and fails on MRPC -3.0*"
    )


def test_a_baseline_at_one_rate_is_labelled_untuned_and_no_star_without_provisional_tasks(tmp_path):
    for seed in (0, 1, 2):
        fake_point(tmp_path, "mrpc", "full", 5e-5, [0.7, 0.82, 0.8, 0.8], seed=seed, trainable=22_713_602)
        fake_point(tmp_path, "mrpc", "lora", 2e-3, [0.7, 0.81, 0.8, 0.8], seed=seed, trainable=222_338)
    for lr in (2e-5, 1e-4):
        fake_point(tmp_path, "mrpc", "full", lr, [0.7, 0.75, 0.75, 0.75])
    for lr in (5e-4, 1e-3, 4e-3):
        fake_point(tmp_path, "mrpc", "lora", lr, [0.7, 0.75, 0.75, 0.75])
    fake_point(tmp_path, "mrpc", "adapter_h", 2e-3, [0.7, 0.79, 0.78, 0.78], trainable=237_026)

    lines = tuned_section(tmp_path, tmp_path / "tables")
    rows = {line.split(" | ")[0]: line for line in lines if line.startswith("| ")}
    baseline = rows["| adapter_h (one lr: 0.002, not tuned)"]
    assert baseline.startswith("| adapter_h (one lr: 0.002, not tuned) | 237,026 | 79.0")
    assert "| 222,338 | 81.0 <sub>n=3" in rows["| LoRA r=8 α=8 q,v (tuned lr)"]
    assert lines[-1].endswith("holds on MRPC -1.0 and fails on no task (LoRA − FT, points).")


def test_peft_reference_runs_get_their_own_row_and_the_seed_range_check(tmp_path):
    fake_point(tmp_path, "mrpc", "full", 5e-5, [0.7, 0.80, 0.75, 0.74])
    for lr, best in ((1e-3, 0.78), (2e-3, 0.81)):
        fake_point(tmp_path, "mrpc", "lora", lr, [0.7, 0.72, best, 0.77])
    fake_point(tmp_path, "mrpc", "lora", 2e-3, [0.7, 0.80, 0.7, 0.7], seed=1)
    fake_point(tmp_path, "mrpc", "lora", 2e-3, [0.7, 0.82, 0.7, 0.7], seed=2)
    fake_point(tmp_path, "mrpc", "lora", 1e-3, [0.99, 0.7, 0.7, 0.7], peft=True)  # better, but never selects
    fake_point(tmp_path, "mrpc", "lora", 2e-3, [0.7, 0.79, 0.7, 0.7], peft=True)
    fake_point(tmp_path, "mrpc", "lora", 2e-3, [0.7, 0.80, 0.7, 0.7], seed=1, peft=True)

    assert selected(read_grid(tmp_path))[("mrpc", "lora")].lr == 2e-3
    grid = lr_selection_table(tmp_path, tmp_path / "tables")
    assert "99.0" not in grid and grid.count("| MRPC | LoRA") == 2
    lines = tuned_section(tmp_path, tmp_path / "tables")
    rows = {line.split(" | ")[0]: line for line in lines if line.startswith("| ")}
    assert "81.0 <sub>n=3 80.0–82.0" in rows["| LoRA r=8 α=8 q,v (tuned lr)"]
    assert "79.5 <sub>n=2 79.0–80.0" in rows["| PEFT+torch LoRA r=8 α=8 q,v (at LoRA's tuned lr)"]
    check = next(line for line in lines if "PEFT+torch seed range" in line)
    assert "**no** — lora_jax 81.0 (n=3), PEFT+torch 79.0–80.0 (n=2) (provisional: 2 PEFT seed(s), not 3)" in check


def test_cola_borrows_the_middle_of_each_methods_selected_rates(tmp_path):
    """CoLA has no grid of its own: its seeds count at the middle of the rates MRPC, RTE and STS-B selected, a
    CoLA run at any other rate does not, and no CoLA run ever appears in (or selects from) the grid table."""
    for task, ft_lr, lora_lr in (("mrpc", 5e-5, 2e-3), ("rte", 2e-5, 1e-3), ("stsb", 1e-4, 1e-3)):
        for lr in (2e-5, 5e-5, 1e-4):
            fake_point(tmp_path, task, "full", lr, [0.7, 0.9 if lr == ft_lr else 0.8])
        for lr in (5e-4, 1e-3, 2e-3, 4e-3):
            fake_point(tmp_path, task, "lora", lr, [0.7, 0.9 if lr == lora_lr else 0.8])
    for seed in (0, 1, 2):
        fake_point(tmp_path, "cola", "full", 5e-5, [0.50, 0.55 + seed / 100], seed=seed)
        fake_point(tmp_path, "cola", "lora", 1e-3, [0.50, 0.52 + seed / 100], seed=seed)
    fake_point(tmp_path, "cola", "lora", 2e-3, [0.99, 0.99])  # not the borrowed rate: ignored

    assert ("cola", "lora") not in selected(read_grid(tmp_path))
    assert "CoLA" not in lr_selection_table(tmp_path, tmp_path / "tables")
    lines = tuned_section(tmp_path, tmp_path / "tables")
    assert any("CoLA (no grid of its own): the middle of each method's selected rates, full FT 5e-05, "
               "LoRA r=8 α=8 W_q,W_v 0.001." in line for line in lines)  # fmt: skip
    cola = next(line for line in lines if line.startswith("- CoLA"))
    assert "**no** — gap -3.0 (LoRA 53.0, n=3, range 52.0–54.0; FT 56.0, n=3, range 55.0–57.0); " in cola
    assert any(line.endswith("The seeds' 95% intervals settle no task; CoLA would need more seeds.") for line in lines)


def test_a_baseline_with_a_grid_of_its_own_says_its_rate_was_selected(tmp_path):
    for lr, best in ((1e-3, 0.80), (2e-3, 0.84), (4e-3, 0.78)):
        fake_point(tmp_path, "mrpc", "adapter_h", lr, [0.7, best])
    fake_point(tmp_path, "mrpc", "adapter_h", 2e-3, [0.7, 0.82], seed=1)
    fake_point(tmp_path, "mrpc", "adapter_h", 4e-3, [0.7, 0.99], seed=1)  # not the selected rate: not a seed
    rows = [line for line in tuned_section(tmp_path, tmp_path / "tables") if line.startswith("| adapter_h")]
    title = "| adapter_h (lr per task selected on seed 0 among 0.001, 0.002, 0.004)"
    assert rows[0].startswith(f"{title} | — | 83.0 <sub>n=2")
    table = lr_selection_table(tmp_path, tmp_path / "tables")
    bold = [line for line in table.splitlines() if line.startswith("| MRPC") and "**" in line]
    assert len(bold) == 1 and "lr0.002" in bold[0] and "**84.0**" in bold[0]
    assert table.rstrip().endswith("MRPC adapter_h lr 0.002 (84.0).")


def test_a_tie_goes_to_the_lower_rate(tmp_path):
    for lr in (1e-4, 2e-5, 5e-5):  # folder order (lr0.0001 first) is not the rates' order
        fake_point(tmp_path, "mrpc", "full", lr, [0.7, 0.8 if lr != 2e-5 else 0.79])
    assert selected(read_grid(tmp_path))[("mrpc", "full")].lr == 5e-5


def test_a_baseline_at_one_rate_is_not_shown_as_selected(tmp_path):
    fake_point(tmp_path, "mrpc", "adapter_h", 2e-3, [0.7, 0.84])
    fake_point(tmp_path, "mrpc", "adapter_h", 4e-3, [0.7, 0.9], finished=False)  # training: not a grid point yet
    table = lr_selection_table(tmp_path, tmp_path / "tables")
    rows = [line for line in table.splitlines() if line.startswith("| MRPC")]
    assert len(rows) == 2 and not any("**" in row for row in rows)
    assert "Selected among" not in table


def test_a_prefix_run_whose_text_was_cut_is_its_own_row_and_never_a_grid_point(tmp_path):
    fake_point(tmp_path, "mrpc", "full", 5e-5, [0.80, 0.82])
    fake_point(tmp_path, "mrpc", "lora", 1e-3, [0.78, 0.80])
    prefix = {"prefix": {"l_p": 32, "l_i": 0}}
    fake_point(
        tmp_path, "mrpc", "prefix_layer", 2e-3, [0.70, 0.74], extra={**prefix, "data": {"max_len": 128}}, name="old_cut"
    )  # before text_plus_special: 96 text tokens
    fake_point(tmp_path, "mrpc", "prefix_layer", 1e-2, [0.72, 0.73], extra={**prefix, "data": {"max_len": 160}})
    setting = ("mrpc", "prefix_layer l_p=32 l_i=0")  # a baseline's rate is selected per method and size
    assert selected(read_grid(tmp_path))[setting].lr == 1e-2  # the cut run is not a grid point
    table = "\n".join(tuned_section(tmp_path, tmp_path / "tables"))
    assert "| prefix_layer l_p=32 l_i=0, text cut at 96 tokens (one lr: 0.002, not tuned) |" in table
    assert "| prefix_layer l_p=32 l_i=0 (one lr: 0.01, not tuned) |" in table


def test_seed_interval_says_whether_the_seeds_settle_the_verdict(tmp_path):
    """Welch's 95% interval of the mean gap: two points of spread and a 3-point gap (t=2.78 on 4 degrees of
    freedom, half-width 2.27) cannot exclude a 1-point gap; the same gap with a tenth of the spread can; and a
    gap of zero with little spread shows LoRA within a point."""

    def runs(task, method, scores):  # fmt: skip
        for seed, s in enumerate(scores):
            fake_point(tmp_path / task, task, method, 1e-3 if method == "lora" else 5e-5, [s], seed=seed)
        return [p for p in read_grid(tmp_path / task) if p.method == method]

    wide = tuned_table.seed_interval(runs("a", "lora", [0.53, 0.52, 0.54]), runs("a", "full", [0.56, 0.55, 0.57]))
    assert str(wide) == "; mean gap's 95% CI over seeds -5.3 to -0.7 (Welch t): too few seeds to settle it either way"
    tight = tuned_table.seed_interval(
        runs("b", "lora", [0.530, 0.529, 0.531]), runs("b", "full", [0.560, 0.559, 0.561])
    )
    assert "-3.2 to -2.8 (Welch t): the seeds show LoRA trails by more than 1" in str(tight)
    level = tuned_table.seed_interval(
        runs("c", "lora", [0.560, 0.559, 0.561]), runs("c", "full", [0.560, 0.559, 0.561])
    )
    assert wide.settled is None and level.settled == "the seeds show LoRA within 1"
    assert str(level).endswith("-0.2 to +0.2 (Welch t): the seeds show LoRA within 1")
    assert tuned_table.seed_interval(runs("d", "lora", [0.5]), runs("d", "full", [0.6, 0.7])) is None


@pytest.mark.parametrize(
    "method, grid, last, pick",
    [  # a rate of the grid not run yet; the best at the top rate tried (doubled again); at the lowest (halved)
        ("adapter_l", ((1e-3, 0.78), (2e-3, 0.80)), (4e-3, 0.79), "0.002"),
        ("prefix_layer", ((1e-3, 0.75), (2e-3, 0.72), (4e-3, 0.76)), (8e-3, 0.74), "0.004"),
        ("adapter_h", ((1e-3, 0.80), (2e-3, 0.78), (4e-3, 0.79)), (5e-4, 0.77), "0.001"),
    ],
)
def test_a_baseline_is_unsettled_until_its_grid_has_run_and_its_best_is_not_the_top_rate(
    tmp_path, method, grid, last, pick
):
    def selected_line() -> str:
        return next(line for line in tuned_section(tmp_path, tmp_path / "tables") if line.startswith("Selected"))

    for lr, best in grid:
        fake_point(tmp_path, "mrpc", method, lr, [0.7, best])
    assert f"MRPC {method} {pick} (grid unfinished)" in selected_line()
    fake_point(tmp_path, "mrpc", method, last[0], [0.7, last[1]])
    assert f"MRPC {method} {pick}" in selected_line() and "unfinished" not in selected_line()


def test_each_method_has_its_grid():
    assert lr_selection.grid_lrs("prefix_embed") == (2e-3, 4e-3, 8e-3) and lr_selection.grid_lrs("full")[0] == 2e-5


def test_two_sizes_of_a_baseline_are_two_settings_each_with_its_grid_rate_and_row(tmp_path):
    for r, rates in ((8, {1e-3: 0.80, 2e-3: 0.84, 4e-3: 0.78}), (64, {1e-3: 0.86, 2e-3: 0.70, 4e-3: 0.75})):
        for lr, best in rates.items():
            fake_point(tmp_path, "mrpc", "adapter_h", lr, [0.7, best], extra={"adapter": {"r": r}},
                       name=f"adapter_h_r{r}_seed0_lr{lr:g}")  # fmt: skip
    chosen = selected(read_grid(tmp_path))
    assert chosen[("mrpc", "adapter_h r=8")].lr == 2e-3 and chosen[("mrpc", "adapter_h r=64")].lr == 1e-3
    rows = [line for line in tuned_section(tmp_path, tmp_path / "tables") if line.startswith("| adapter_h")]
    assert [row.split(" (")[0] for row in rows] == ["| adapter_h r=64", "| adapter_h r=8"]
    assert "84.0" in rows[1] and "86.0" in rows[0]
