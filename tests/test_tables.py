"""aggregate.py and tables.py on fake run folders: medians over seeds, links, and cells with no run."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # the table scripts in subprocesses

ROOT = Path(__file__).resolve().parents[1]


def fake_run(results: Path, task: str, method: str, seed: int, best: float) -> Path:
    run = f"lora_r8_a8_seed{seed}" if method == "lora" else f"{method}_seed{seed}"
    folder = results / "glue_minilm" / task / run
    folder.mkdir(parents=True)
    summary = {
        "exp": "glue_minilm", "task": task, "run": run, "seed": seed, "method": method, "best": best,
        "main_metric": "accuracy", "trainable_params": 222_338 if method == "lora" else 22_713_986,
        "history": [{"epoch": e} for e in range(3)], "lora": {"r": 8, "alpha": 8} if method == "lora" else None,
    }  # fmt: skip
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "config.yaml").write_text(yaml.safe_dump({"optim": {"lr": 1e-3 if method == "lora" else 5e-5}}))
    return folder


def test_aggregate_reports_the_median_over_seeds(tmp_path):
    for seed, best in enumerate([0.80, 0.70, 0.90]):
        fake_run(tmp_path, "mrpc", "lora", seed, best)
    out = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "aggregate.py"), "exp=glue_minilm", f"results_dir={tmp_path}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    line = next(row for row in out.splitlines() if row.startswith("mrpc"))
    assert "lora_r8_a8" in line and " 0.8000 " in line and " 3 " in line


def test_glue_minilm_table_has_medians_links_gaps_and_missing_cells(tmp_path):
    for seed, (lora, full) in enumerate([(0.80, 0.82), (0.70, 0.84), (0.90, 0.83)]):
        fake_run(tmp_path, "mrpc", "lora", seed, lora)
        fake_run(tmp_path, "mrpc", "full", seed, full)
    fake_run(tmp_path, "rte", "lora", 0, 0.6)
    out = tmp_path / "tables"
    subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "tables.py"), f"results_dir={tmp_path}", f"out={out}"], check=True
    )
    text = (out / "glue_minilm.md").read_text()
    lora_row = next(row for row in text.splitlines() if row.startswith("| LoRA r=8"))
    full_row = next(row for row in text.splitlines() if row.startswith("| FT"))
    assert "80.0 <sub>n=3 70.0–90.0 " in lora_row and "60.0 <sub>n=1 [0]" in lora_row
    assert "83.0 <sub>n=3 82.0–84.0 " in full_row and "no run" in full_row  # no full-FT run on RTE
    assert "../glue_minilm/mrpc/lora_r8_a8_seed0" in lora_row
    assert "MRPC -3.0" in text
    assert "paper: roberta_base LoRA" in text and "89.7" in text  # the paper's number from paper_numbers.yaml


def fake_sweep_run(results: Path, exp: str, targets: list[str], r: int, best: float, lr: float = 1e-3,
                   task: str = "stsb", epochs: int = 1) -> None:  # fmt: skip
    run = f"lora_{''.join(targets)}_r{r}_seed0"
    folder = results / exp / task / run
    folder.mkdir(parents=True)
    summary = {
        "exp": exp, "task": task, "run": run, "seed": 0, "method": "lora", "best": best, "main_metric": "pearson",
        "trainable_params": 1, "history": [], "lora": {"r": r, "alpha": 8},
    }  # fmt: skip
    config = {
        "optim": {"lr": lr, "epochs": epochs, "batch_size": 16, "warmup_ratio": 0.06}, "data": {"max_len": 128},
        "lora": {"targets": targets, "alpha": 8, "dropout": 0.0}, "model": {"name_or_path": "m"},
    }  # fmt: skip
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "config.yaml").write_text(yaml.safe_dump(config))


def test_sweep_tables_fill_their_own_cells_from_identically_trained_runs_of_the_other(tmp_path):
    fake_sweep_run(tmp_path, "rank_minilm", ["q", "v"], 8, 0.80)
    fake_sweep_run(tmp_path, "weight_type_minilm", ["q"], 8, 0.77)  # a Table 6 cell too
    fake_sweep_run(tmp_path, "weight_type_minilm", ["k"], 8, 0.76)  # Table 5 only
    fake_sweep_run(tmp_path, "weight_type_minilm", ["q", "k", "v", "o"], 2, 0.83, lr=5e-4)  # trained otherwise
    (tmp_path / "rank_minilm" / "COMMANDS.md").write_text("how")
    out = tmp_path / "tables"
    subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "tables.py"), f"results_dir={tmp_path}", f"out={out}"], check=True
    )
    rows = {row.split(" | ")[0] + " | " + row.split(" | ")[1]: row
            for row in (out / "table6_rank.md").read_text().splitlines() if row.startswith("| W")}  # fmt: skip
    assert "77.0" in rows["| Wq | 8"] and rows["| Wq | 8"].count("†") == 1
    assert "80.0" in rows["| Wq, Wv | 8"] and "†" not in rows["| Wq, Wv | 8"]
    assert "no run" in rows["| Wq, Wk, Wv, Wo | 2"]  # a different lr: not borrowed
    assert not any(key.startswith("| Wk") for key in rows)  # borrowed runs fill cells, never add rows
    table5 = (out / "table5_weight_types.md").read_text()
    assert "76.0" in table5 and "†" not in table5
    assert "[COMMANDS.md](../rank_minilm/COMMANDS.md)" in (out / "table6_rank.md").read_text()
    assert "COMMANDS.md" not in table5  # no such file beside weight_type_minilm's runs


def test_table5_takes_mrpc_from_its_3_epoch_sweep_and_says_which_settings_each_column_has(tmp_path):
    sys.path.insert(0, str(ROOT / "experiments"))
    from tables import TABLE5_EXPS, sweep_table

    fake_sweep_run(tmp_path, "weight_type_minilm", ["k"], 8, 0.71, task="mrpc")  # the 1-epoch MRPC run: replaced
    fake_sweep_run(tmp_path, "weight_type_minilm", ["k"], 8, 0.76)  # STS-B, 1 epoch
    fake_sweep_run(tmp_path, "weight_type_minilm", ["v"], 8, 0.72, task="mrpc")  # no 3-epoch Wv run yet
    fake_sweep_run(tmp_path, "weight_type_minilm_3ep", ["k"], 8, 0.79, task="mrpc", epochs=3)
    fake_sweep_run(tmp_path, "rank_minilm", ["q"], 8, 0.80, task="mrpc")  # 1 epoch: may fill STS-B-like cells only
    out = tmp_path / "tables"
    table = sweep_table(tmp_path, out, TABLE5_EXPS, "table5", "rank_minilm")
    row = next(line for line in table.splitlines() if line.startswith("| Wk | 8"))
    assert "| 79.0 <sub>" in row and "| 76.0 <sub>" in row and "71.0" not in row
    assert "Trained (MRPC: `weight_type_minilm_3ep`): 3 epoch(s)" in table
    assert "Trained (STS-B: `weight_type_minilm`): 1 epoch(s)" in table
    wq = next(line for line in table.splitlines() if line.startswith("| Wq | 8"))
    assert "80.0" not in wq  # trained for 1 epoch, the MRPC column's cells for 3: not borrowed
    wv = next(line for line in table.splitlines() if line.startswith("| Wv | 8"))
    assert "72.0" not in wv and "| no run |" in wv  # the MRPC column never mixes in a 1-epoch cell


def test_figures_page_links_every_analysed_pair_and_averages_phi_over_layers(tmp_path):
    analysis = tmp_path / "results" / "analysis" / "r8_vs_r64"
    analysis.mkdir(parents=True)
    pair = {
        "runs": ["lora_qv_r8_seed0", "lora_qv_r64_seed0"], "ranks": [8, 64], "layer": 1,
        "figures": ["fig3_a__b.png", "fig4_a__b.png"], "random_control": [[0.002]],
        "phi": {"attention.self.query": {"0": [[0.5]], "1": [[0.7]]}, "attention.self.value": {"0": [[0.1]]}},
    }  # fmt: skip
    (analysis / "subspace.json").write_text(json.dumps([pair]))
    out = tmp_path / "paper_tables"
    subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "tables.py"), f"results_dir={tmp_path / 'results'}", f"out={out}"],
        check=True, capture_output=True, cwd=ROOT / "experiments",
    )  # fmt: skip
    page = (out / "figures_subspace.md").read_text()
    assert "lora_qv_r8_seed0 (r=8) vs lora_qv_r64_seed0 (r=64)" in page
    assert "attention.self.query 0.600, attention.self.value 0.100; random control 0.002" in page
    assert "![fig4_a__b.png](../results/analysis/r8_vs_r64/fig4_a__b.png)" in page


def test_e2e_table_puts_the_paper_beside_our_labelled_runs_with_the_computed_counts(tmp_path):
    folder = tmp_path / "e2e_smollm2" / "e2e" / "lora_r4_a32_seed0"
    folder.mkdir(parents=True)
    scores = {"BLEU": 0.5012, "NIST": 6.12, "METEOR": 0.3501, "ROUGE_L": 0.6123, "CIDEr": 1.234}
    summary = {
        "exp": "e2e_smollm2", "task": "e2e", "run": "lora_r4_a32_seed0", "seed": 0, "method": "lora",
        "main_metric": "BLEU", "best": 0.5012, "best_epoch": 1, "trainable_params": 230_400, "train_rows": 2000,
        "history": [{"epoch": 0, **{k: 0.1 for k in scores}}, {"epoch": 1, **scores}], "outputs": "test_outputs.txt",
    }  # fmt: skip
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "config.yaml").write_text(yaml.safe_dump({"optim": {"epochs": 2, "lr": 5e-4}, "lora": {"r": 4,
                                                        "alpha": 32, "targets": ["q", "v"]}}))  # fmt: skip
    (folder / "test_outputs.txt").write_text("a\nb\nc\n")
    baseline = folder.parent / "prefix_layer_lp10_li0_seed0"
    baseline.mkdir()
    (baseline / "summary.json").write_text(json.dumps({**summary, "run": baseline.name, "method": "prefix_layer"}))
    baseline_config = {"optim": {"epochs": 2, "lr": 5e-3}, "prefix": {"l_p": 10, "l_i": 0},
                       "generate": {"ngram_over_prompt": False}}  # fmt: skip
    (baseline / "config.yaml").write_text(yaml.safe_dump(baseline_config))
    out = tmp_path / "tables"
    subprocess.run([sys.executable, str(ROOT / "experiments" / "tables.py"), f"results_dir={tmp_path}", f"out={out}"],
                   check=True, capture_output=True)  # fmt: skip
    table = (out / "table3_e2e.md").read_text()
    assert "| GPT-2 M (LoRA) | 0.35M | 393,216 | 70.4 ±0.1 | 8.85 ±0.02 |" in table
    assert "| GPT-2 L (LoRA) | 0.77M | 737,280 |" in table and "microsoft/LoRA issue 172" in table
    row = next(line for line in table.splitlines() if line.startswith("| SmolLM2-135M LoRA"))
    assert any(line.startswith("| SmolLM2-135M PreLayer l_p=10 l_i=0, lr 0.005 | 2,000") for line in table.splitlines())
    # The best epoch's scores (x100 for BLEU, MET, ROUGE-L), the data it saw, links to its outputs and its folder.
    assert "LoRA r=4 α=32 on q,v, lr 0.0005 | 2,000 of 42,061 | 2 | 230,400 | 50.1 | 6.12 | 35.0 | 61.2 | 1.23 |" in row
    # Which 4-grams beam search banned: a config from before the option decoded with the MR's too.
    assert "| 1.23 | MR + output | [3](../e2e_smollm2/e2e/lora_r4_a32_seed0/test_outputs.txt)" in row
    prelayer = next(line for line in table.splitlines() if line.startswith("| SmolLM2-135M PreLayer"))
    assert "| 1.23 | output | - |" in prelayer
    assert "(../e2e_smollm2/e2e/lora_r4_a32_seed0)" in row and "different," in table


def test_scaling_figure_lists_each_method_by_size_and_draws_one_curve_each(tmp_path):
    sys.path.insert(0, str(ROOT / "experiments"))
    from tables import scaling_figure

    def fake(method: str, run: str, config: dict, trainable: int, best: float, seed: int = 0) -> None:
        folder = tmp_path / "scaling_minilm" / "stsb" / f"{run}_seed{seed}"
        folder.mkdir(parents=True)
        summary = {"exp": "scaling_minilm", "task": "stsb", "run": f"{run}_seed{seed}", "seed": seed,
                   "method": method, "best": best, "main_metric": "pearson", "trainable_params": trainable}  # fmt: skip
        (folder / "summary.json").write_text(json.dumps(summary))
        (folder / "config.yaml").write_text(yaml.safe_dump({"method": method, **config}))

    fake("lora", "lora_r64_a8", {"lora": {"r": 64}}, 1_000_000, 0.86)
    fake("lora", "lora_r4_a8", {"lora": {"r": 4}}, 60_000, 0.84)
    fake("lora", "lora_r4_a8", {"lora": {"r": 4}}, 60_000, 0.80, seed=1)
    fake("prefix_embed", "prefix_embed_lp32_li0", {"prefix": {"l_p": 32, "l_i": 0}}, 12_288, 0.70)
    out = tmp_path / "tables"
    out.mkdir()
    page = scaling_figure(tmp_path, out)
    rows = [line for line in page.splitlines() if line.startswith("| LoRA") or line.startswith("| Prefix")]
    assert rows[0].startswith("| LoRA | r=4 | 60,000 | STS-B | 82.0 <sub>n=2 80.0–84.0")
    assert rows[1].startswith("| LoRA | r=64 | 1,000,000 | STS-B | 86.0")
    assert rows[2].startswith("| PrefixEmbed | l_p+l_i=32 | 12,288 | STS-B | 70.0")
    assert (out / "figure2_scaling.png").stat().st_size > 1000
    assert "no run yet" in scaling_figure(tmp_path / "empty", out)


def test_the_glue_protocols_tuned_stsb_seeds_are_figure2_points(tmp_path, monkeypatch):
    """LoRA r=8 and a tuned baseline from `+exp=glue_minilm_lrsel` on STS-B join the scaling sweep's points, at the
    selected rate only; a baseline run at one rate (not selected) and another task do not."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import lr_selection
    from tables import scaling_figure

    from tests.test_lr_selection import fake_point

    monkeypatch.setattr(lr_selection, "EPOCHS", 4)  # fake_point's runs train 4 epochs
    for lr in (5e-4, 1e-3, 2e-3, 4e-3):
        fake_point(tmp_path, "stsb", "lora", lr, [0.5, 0.85 if lr == 1e-3 else 0.8], trainable=221_953)
    fake_point(tmp_path, "stsb", "lora", 1e-3, [0.5, 0.87], seed=1, trainable=221_953)
    fake_point(tmp_path, "mrpc", "lora", 1e-3, [0.5, 0.80], trainable=222_338)
    adapter = {"adapter": {"r": 8}}
    for lr, best in ((1e-3, 0.84), (2e-3, 0.83), (4e-3, 0.82)):
        fake_point(tmp_path, "stsb", "adapter_h", lr, [0.5, best], trainable=236_641, extra=adapter,
                   name=f"adapter_h_r8_seed0_lr{lr:g}")  # fmt: skip
    fake_point(tmp_path, "stsb", "adapter_l", 1e-3, [0.5, 0.9], extra={"adapter": {"r": 16}})  # one rate
    out = tmp_path / "tables"
    out.mkdir()
    rows = [line for line in scaling_figure(tmp_path, out).splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 2
    assert rows[0].startswith("| LoRA | r=8 | 221,953 | STS-B | 86.0 <sub>n=2 85.0–87.0")
    assert rows[0].endswith("| glue_minilm_lrsel |") and "lr0.001" in rows[0] and "lr0.002" not in rows[0]
    assert rows[1].startswith("| Adapter^H | r=8 | 236,641 | STS-B | 84.0 <sub>n=1")


def fake_e2e_run(results: Path, run: str, method: str, bleu: float, trainable: int, mrs: int, paper_rule: bool,
                 extra: dict) -> None:  # fmt: skip
    folder = results / "e2e_smollm2" / "e2e" / run
    folder.mkdir(parents=True)
    scores = {"BLEU": bleu, "NIST": 7.0, "METEOR": 0.4, "ROUGE_L": 0.7, "CIDEr": 2.5}
    summary = {"exp": "e2e_smollm2", "task": "e2e", "run": run, "seed": 0, "method": method, "best": bleu,
               "main_metric": "BLEU", "best_epoch": 0, "trainable_params": trainable, "train_rows": 2000,
               "history": [{"epoch": 0, **scores}]}  # fmt: skip
    (folder / "summary.json").write_text(json.dumps(summary))
    config = {"optim": {"epochs": 1, "lr": 5e-4}, "generate": {"ngram_over_prompt": not paper_rule}, **extra}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "test_outputs.txt").write_text("x\n" * mrs)


def test_e2e_table_compares_methods_only_on_the_same_decoding_rule_and_mrs(tmp_path):
    sys.path.insert(0, str(ROOT / "experiments"))
    from nlg_tables import e2e_table
    from tables import paper_numbers

    fake = functools.partial(fake_e2e_run, tmp_path)
    lora = {"lora": {"r": 4, "alpha": 32, "targets": ["q", "v"]}}
    fake("lora_r4", "lora", 0.70, 230_400, 100, True, lora)
    fake("lora_r8_all", "lora", 0.74, 2_442_240, 100, True, {"lora": {**lora["lora"], "r": 8}})
    fake("adapter_h_r4", "adapter_h", 0.72, 346_416, 100, True, {"adapter": {"r": 4}})
    fake("ft_top2", "ft_top2", 0.60, 7_080_192, 100, True, {})
    fake("full_all", "full", 0.80, 134_515_008, 630, True, {})  # all 630 MRs: another footing
    fake("adapter_h_old", "adapter_h", 0.90, 346_416, 100, False, {"adapter": {"r": 4}})  # transformers' rule
    table = e2e_table(tmp_path, tmp_path / "tables", paper_numbers()["table3"])
    same, other = table.split("## Ours, other decodes")
    assert "first 100 test MRs" in same and "full_all" not in same and "adapter_h_old" not in same
    assert "full_all" in other and "adapter_h_old" in other
    names = [line.split(" | ")[0] for line in same.splitlines() if line.startswith("| SmolLM2")]
    assert [n.split(",")[0].removeprefix("| SmolLM2-135M ") for n in names] == [
        "FT^Top2", "Adapter^H r=4", "LoRA r=4 α=32 on q", "LoRA r=8 α=32 on q"]
    # The verdict is computed: LoRA's best (74.0) leads; its smallest row (70.0, 230,400) trails Adapter^H (72.0).
    assert "LoRA 74.0 (2,442,240) against FT^Top2 60.0 (7,080,192), Adapter^H 72.0 (346,416)" in same
    assert "LoRA's is the highest" in same
    assert ("BLEU 70.0) against the methods that train at least as many: behind Adapter^H 72.0 (346,416); ahead of "
            "FT^Top2 60.0 (7,080,192).") in same


def test_e2e_bootstrap_puts_intervals_and_p_values_beside_covered_rows_only(tmp_path):
    sys.path.insert(0, str(ROOT / "experiments"))
    from e2e_bootstrap import BOOTSTRAP_FILE, bootstrap
    from nlg_tables import e2e_table
    from tables import paper_numbers

    refs = [[f"name{i} serves food in the centre .", f"name{i} is a place ."] for i in range(30)]
    outputs = {"lora_r8": [r[0] for r in refs], "adapter_h_r4": [f"name{i} serves food ." for i in range(30)]}
    for run, method, extra in (("lora_r8", "lora", {"lora": {"r": 8, "alpha": 32, "targets": ["q", "v"]}}),
                               ("adapter_h_r4", "adapter_h", {"adapter": {"r": 4}})):  # fmt: skip
        folder = tmp_path / "e2e_smollm2" / "e2e" / run
        folder.mkdir(parents=True)
        config = {"optim": {"epochs": 1, "lr": 5e-4}, "generate": {"ngram_over_prompt": False}, **extra}
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        (folder / "test_outputs.txt").write_text("\n".join(outputs[run]) + "\n")
        scores = {"BLEU": 0.5, "NIST": 7.0, "METEOR": 0.4, "ROUGE_L": 0.7, "CIDEr": 2.5}
        summary = {"exp": "e2e_smollm2", "task": "e2e", "run": run, "seed": 0, "method": method, "best": 0.5,
                   "main_metric": "BLEU", "best_epoch": 0, "trainable_params": 1000, "train_rows": 2000,
                   "history": [{"epoch": 0, **scores}]}  # fmt: skip
        (folder / "summary.json").write_text(json.dumps(summary))
    # 30 MRs' references for 30 output lines; the first 30 of a longer list, as generate.max_mrs takes them.
    result = bootstrap(tmp_path, [*refs, ["unused ."]], n_samples=100)
    assert result["mrs"] == 30 and set(result["runs"]) == {"lora_r8", "adapter_h_r4"}
    assert result["p_values"]["lora_r8"]["adapter_h_r4"] < 0.05
    (tmp_path / "e2e_smollm2" / BOOTSTRAP_FILE).write_text(json.dumps(result))
    # The summaries' BLEU (0.5) is not what the outputs score: the rows are not covered, so no interval is printed.
    table = e2e_table(tmp_path, tmp_path / "tables", paper_numbers()["table3"])
    rows = [line for line in table.splitlines() if line.startswith("| SmolLM2")]
    assert len(rows) == 2 and not any(" ±" in row for row in rows)
    assert "not covered yet (rerun it): adapter_h_r4, lora_r8" in table
    for run, score in result["runs"].items():  # now each summary holds what its outputs score
        path = tmp_path / "e2e_smollm2" / "e2e" / run / "summary.json"
        summary = json.loads(path.read_text())
        summary["history"][0]["BLEU"] = summary["best"] = score["bleu"] / 100
        path.write_text(json.dumps(summary))
    table = e2e_table(tmp_path, tmp_path / "tables", paper_numbers()["table3"])
    lora = result["runs"]["lora_r8"]
    assert f"| {lora['bleu']:.1f} ±{lora['ci95']:.1f} |" in table
    assert f"p={result['p_values']['lora_r8']['adapter_h_r4']:.3f})" in table and "not covered" not in table


def test_index_page_links_every_page_with_the_verdicts_it_computes(tmp_path):
    sys.path.insert(0, str(ROOT / "experiments"))
    from tables import index_page

    (tmp_path / "table1_latency.md").write_text("# Table 1 analogue: latency (generated by benchmarks/x.py)\n")
    tables = {"glue_minilm.md": "# GLUE dev (generated by `x`)\n\nUnder the tuned protocol the claim holds on MRPC.\n",
              "table5_weight_types.md": "# Table 5 analogue (generated by `x`)\n| a | b |\n"}  # fmt: skip
    page = index_page(tables, tmp_path)
    assert "- [GLUE dev](glue_minilm.md)\n  - Under the tuned protocol the claim holds on MRPC." in page
    assert "- [Table 1 analogue: latency](table1_latency.md)" in page and "- [Table 5 analogue]" in page
    assert "| a |" not in page


def test_e2e_verdict_compares_settings_by_their_median_over_seeds(tmp_path):
    sys.path.insert(0, str(ROOT / "experiments"))
    from nlg_tables import e2e_table
    from tables import paper_numbers

    lora = {"lora": {"r": 4, "alpha": 32, "targets": ["q", "v"]}}
    fake_e2e_run(tmp_path, "lora_r4_seed0", "lora", 0.70, 230_400, 100, True, lora)
    fake_e2e_run(tmp_path, "adapter_h_r4_seed0", "adapter_h", 0.72, 346_416, 100, True, {"adapter": {"r": 4}})
    fake_e2e_run(tmp_path, "adapter_h_r4_seed1", "adapter_h", 0.66, 346_416, 100, True, {"adapter": {"r": 4}})
    table = e2e_table(tmp_path, tmp_path / "tables", paper_numbers()["table3"])
    assert len([line for line in table.splitlines() if line.startswith("| SmolLM2-135M Adapter^H")]) == 2  # each seed
    # Adapter^H's best seed (72.0) beats LoRA's 70.0, its median over two seeds (69.0) does not.
    assert "against Adapter^H 69.0 (346,416, median of 2 seeds): LoRA's is the highest" in table


def test_weight_type_reading_checks_the_papers_table5_claim_per_column():
    """Computed from the medians once every row has run: the best multi-type row against the best single type,
    and the worst row; fewer than 3 seeds is said, a missing row gives no line."""
    from aggregate import Group
    from tables import weight_type_reading

    def cell(*scores):
        return Group("e", "mrpc", "x", tuple({"best": s, "seed": i} for i, s in enumerate(scores)))

    column = {("q", 8): cell(0.70, 0.71, 0.72), ("k", 8): cell(0.69, 0.70, 0.70), ("v", 8): cell(0.74, 0.75, 0.75),
              ("o", 8): cell(0.76, 0.76, 0.77), ("qk", 4): cell(0.72, 0.72, 0.73), ("qv", 4): cell(0.78, 0.79, 0.79),
              ("qkvo", 2): cell(0.77, 0.77, 0.78)}  # fmt: skip
    lines = weight_type_reading({"mrpc": column}, 7)
    assert lines[-1] == ("- MRPC: several types beat one: **yes** — Wq, Wv r=4 79.0 against Wo r=8 76.0; worst "
                         "Wk r=8 70.0 (W_q or W_k alone, as the paper).")  # fmt: skip
    column[("o", 8)] = cell(0.80)
    assert lines != weight_type_reading({"mrpc": column}, 7)
    assert weight_type_reading({"mrpc": column}, 7)[-1].endswith("Wo r=8 80.0; worst Wk r=8 70.0 (W_q or W_k "
                                                                  "alone, as the paper); provisional: 1 seed(s).")
    assert "**no**" in weight_type_reading({"mrpc": column}, 7)[-1]
    assert weight_type_reading({"mrpc": {k: v for k, v in column.items() if k != ("q", 8)}}, 7) == []
