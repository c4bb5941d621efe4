"""The notebooks in notebooks/ run top to bottom in a real Jupyter kernel (jupytext + nbclient) and produce what
they promise: the subspace notebook on its self-built demo runs, the comparison notebook on fake run folders
written here. Parameters are injected as papermill does: a cell right after the one tagged `parameters`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from lora_jax.logging import JsonlLogger

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
plt_image = pytest.importorskip("matplotlib.image")
import nbformat  # noqa: E402 (installed with nbclient)

pytestmark = pytest.mark.slow  # executes the notebooks in a Jupyter kernel

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute(name: str, cwd: Path, **parameters) -> list[dict]:
    """Run notebooks/<name> with `parameters` in a fresh kernel started in `cwd`; returns every cell output."""
    notebook = jupytext.read(NOTEBOOKS / name)
    tagged = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name} needs exactly one cell tagged 'parameters'"
    source = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    notebook.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    client = nbclient.NotebookClient(
        notebook, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]


def shown(outputs: list[dict], mime: str) -> int:
    """How many outputs Jupyter would render as `mime` (image/png: figures inline; text/markdown: tables)."""
    return sum(mime in output.get("data", {}) for output in outputs)


def assert_drawn(path: Path) -> None:
    image = plt_image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 300 and image.std() > 0.01, path  # drawn, not blank


def phi_by_definition(a1: np.ndarray, a2: np.ndarray) -> np.ndarray:
    """||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j), cell by cell."""
    u1, u2 = np.linalg.svd(a1, full_matrices=False)[0], np.linalg.svd(a2, full_matrices=False)[0]
    return np.array([[np.linalg.norm(u1[:, :i].T @ u2[:, :j]) ** 2 / min(i, j) for j in range(1, u2.shape[1] + 1)]
                     for i in range(1, u1.shape[1] + 1)])  # fmt: skip


def test_subspace_notebook_on_its_demo_runs(tmp_path):
    out = tmp_path / "out"
    outputs = execute("subspace_analysis.py", tmp_path, RUN_A=None, RUN_B=None, OUT=str(out), CROP=2)
    assert shown(outputs, "image/png") == 4 and shown(outputs, "text/markdown") == 2  # inline, not just files
    for name in ("fig3.png", "fig4.png", "fig3_crop2.png", "fig4_crop2.png"):
        assert_drawn(out / name)

    record = json.loads((out / "subspace.json").read_text())
    run_a, run_b = (Path(run) for run in record["runs"])
    layer, (r1, r2) = record["layer"], record["ranks"]
    assert (layer, r1, r2, record["d_in"]) == (1, 4, 16, 64)  # the middle of layers 0, 1; the demo's ranks
    tensors = [load_file(str(run / "adapter" / "adapter.safetensors")) for run in (run_a, run_b)]
    for kind in ("query", "value"):
        key = f"bert.encoder.layer.{layer}.attention.self.{kind}.lora_a"
        phi = np.asarray(record["phi_at_layer"][f"attention.self.{kind}"])
        np.testing.assert_allclose(phi, phi_by_definition(tensors[0][key], tensors[1][key]), atol=1e-6)
    # Trained from independent inits, both demo runs share their top direction; random subspaces: 1/64.
    assert np.asarray(record["phi_at_layer"]["attention.self.query"])[0, 0] > 0.3

    md = (out / "subspace.md").read_text()
    for row in ("| attention.self.query | 0 |", "| attention.self.value | 1 |", "| attention.self.value | mean |"):
        assert row in md

    # Table 7 against W read straight from the demo's base model folder (torch layout: W^T).
    table = json.loads((out / "table7.json").read_text())
    base = Path(yaml.safe_load((run_b / "config.yaml").read_text())["model"]["name_or_path"])
    w = load_file(str(base / "model.safetensors"))[f"encoder.layer.{layer}.attention.self.value.weight"].T
    stats = table["runs"][run_b.name]["attention.self.value"]
    prefix = f"bert.encoder.layer.{layer}.attention.self.value"
    delta = tensors[1][prefix + ".lora_scale"] * tensors[1][prefix + ".lora_a"].astype(np.float64) @ tensors[1][
        prefix + ".lora_b"]  # fmt: skip
    u, s, vt = np.linalg.svd(delta)
    assert stats["r"] == r2 == 16
    assert stats["w_norm"] == pytest.approx(np.linalg.norm(w), rel=1e-5)
    assert stats["delta_norm"] == pytest.approx(np.linalg.norm(delta), rel=1e-5)
    assert stats["proj_delta"] == pytest.approx(np.linalg.norm(u[:, :r2].T @ w @ vt[:r2].T), rel=1e-4)
    assert stats["proj_w"] == pytest.approx(np.sqrt((np.linalg.svd(w, compute_uv=False)[:r2] ** 2).sum()), rel=1e-5)
    assert stats["amplification"] == pytest.approx(stats["delta_norm"] / stats["proj_delta"])
    md = (out / "table7.md").read_text()
    assert sum(line.startswith(f"| {run.name} |") for run in (run_a, run_b) for line in md.splitlines()) == 4
    assert "| paper: GPT-3 175B | W_q, layer 48 | 4 |" in md


def fake_run(results: Path, task: str, run: str, method: str, seed: int, scores: list[float], finished: bool):
    """A run folder as experiments/run.py leaves it: config.yaml, train/metrics.jsonl, summary.json when done."""
    folder = results / "toy" / task / run
    folder.mkdir(parents=True)
    config = {"exp_name": "toy", "task": task, "run": run, "seed": seed, "method": method, "optim": {"lr": 1e-3}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    logger = JsonlLogger(folder)
    for epoch, score in enumerate(scores):
        for step in range(epoch * 20 + 10, (epoch + 1) * 20 + 1, 10):
            logger.log({"step": step, "epoch": epoch, "loss": 0.7 - 0.01 * step, "lr": 1e-3}, "train")
        logger.log({"step": (epoch + 1) * 20, "epoch": epoch, "accuracy": score, "f1": score}, "metrics")
    if finished:
        summary = {"method": method, "main_metric": "accuracy", "best": max(scores),
                   "best_epoch": int(np.argmax(scores)), "history": [], "trainable_params": 1000 if method == "lora"
                   else 50_000, "wall_time_s": 60.0 * (seed + 1), "tokens_per_s": 100.0, "exp": "toy",
                   "task": task, "run": run, "seed": seed}  # fmt: skip
        (folder / "summary.json").write_text(json.dumps(summary))


def test_compare_runs_notebook_on_fake_run_folders(tmp_path, monkeypatch):
    results = tmp_path / "results"
    fake_run(results, "mrpc", "lora_r8_a8_seed0", "lora", 0, [0.60, 0.70], finished=True)
    fake_run(results, "mrpc", "lora_r8_a8_seed1", "lora", 1, [0.65, 0.80], finished=True)
    fake_run(results, "mrpc", "full_seed0", "full", 0, [0.72, 0.85], finished=True)
    fake_run(results, "mrpc", "lora_r8_a8_seed2", "lora", 2, [0.50], finished=False)  # still running
    monkeypatch.setenv("WANDB_MODE", "offline")  # the kernel inherits it: the wandb section must skip, not hang
    out = tmp_path / "out"
    outputs = execute("compare_runs.py", tmp_path, RESULTS_DIR=str(results), EXP="toy", OUT=str(out),
                    WANDB_PROJECT="lora_jax")  # fmt: skip

    assert_drawn(out / "epochs_mrpc.png")
    medians = (out / "medians.md").read_text().splitlines()
    assert "| mrpc | lora_r8_a8 | accuracy | 0.7500 | 2 | 0.7000 0.8000 | 1,000 | 1.5 | 100 |" in medians
    assert "| mrpc | full | accuracy | 0.8500 | 1 | 0.8500 | 50,000 | 1.0 | 100 |" in medians
    runs = (out / "runs.md").read_text()
    assert "| mrpc | lora_r8_a8_seed2 | lora | 2 | running or stopped | 1 | accuracy 0.5000 | - |" in runs
    assert runs.count("| finished |") == 3
    assert any("wandb: skipped, WANDB_MODE=offline" in output.get("text", "") for output in outputs)
    assert shown(outputs, "image/png") == 1 and shown(outputs, "text/markdown") == 2


def test_compare_runs_notebook_refuses_a_missing_experiment(tmp_path):
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="No experiment folder"):
        execute("compare_runs.py", tmp_path, RESULTS_DIR=str(tmp_path), EXP="nothing_here", OUT=str(tmp_path / "o"))


def write_tiny_rte(root: Path, sizes: tuple[tuple[str, int], ...] = (("train", 48), ("dev", 20))) -> Path:
    """RTE-format TSVs under root/RTE: entailment when the second sentence repeats the first's opening words."""
    from tests.conftest import WORDS

    rng = np.random.default_rng(1)
    (root / "RTE").mkdir(parents=True, exist_ok=True)
    for split, n in sizes:
        lines = ["index\tsentence1\tsentence2\tlabel"]
        for i in range(n):
            a = list(rng.choice(WORDS, size=rng.integers(4, 9)))
            entails = bool(rng.integers(2))
            b = a[:3] if entails else list(rng.choice(WORDS, size=3))
            lines.append(f"{i}\t{' '.join(a)}\t{' '.join(b)}\t{'entailment' if entails else 'not_entailment'}")
        (root / "RTE" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def test_adapter_bank_notebook_on_a_tiny_model_and_two_tiny_tasks(tmp_path):
    from tests.conftest import save_tiny_bert, write_tiny_mrpc

    model = save_tiny_bert(tmp_path / "bert", dropout=0.0)
    glue = write_tiny_rte(write_tiny_mrpc(tmp_path / "glue"))
    out = tmp_path / "out"
    outputs = execute("adapter_bank.py", tmp_path, MODEL=str(model), GLUE_DIR=str(glue), TASKS=("mrpc", "rte"),
                      MAX_STEPS=4, MAX_LEN=32, WEIGHTS=(0.0, 0.5, 1.0), OUT=str(out))  # fmt: skip
    assert shown(outputs, "image/png") == 1 and shown(outputs, "text/markdown") == 1
    assert_drawn(out / "interpolation.png")
    text = "".join(output.get("text", "") for output in outputs)
    assert "mixed batch of 8 rows (4 per task)" in text
    rows = [line.split("|")[1:-1] for line in (out / "interpolation.md").read_text().splitlines()[2:]]
    assert [float(r[0]) for r in rows] == [0.0, 0.5, 1.0]
    # The ends of the sweep are each adapter alone: the dev score its own run recorded.
    best = {task: json.loads((out / "runs" / task / "summary.json").read_text())["best"] for task in ("mrpc", "rte")}
    assert float(rows[-1][1]) == pytest.approx(best["mrpc"], abs=1e-4)
    assert float(rows[0][2]) == pytest.approx(best["rte"], abs=1e-4)
