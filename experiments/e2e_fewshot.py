"""The floor of the E2E table: the base model, not fine-tuned, decoding each test MR after a few training pairs.

    python experiments/e2e_fewshot.py +exp=e2e_smollm2 results_dir=/work/e2e-runs [generate.shots=3]

Same model, decoding settings (beam, length penalty, no-repeat-ngram) and scorer as the runs of `+exp=...`; the prompt
is `causal_lm.fewshot_prompt` and an answer ends at its first line break. Writes
<results_dir>/<exp>/e2e/fewshot_k<shots>_seed<seed>/: summary.json (the layout experiments/tables.py reads),
metrics.jsonl (scores, the shots, samples) and test_outputs.txt (one line per MR).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import hydra
import jax.numpy as jnp
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from lora_jax import causal_lm
from lora_jax.config import decode_config, model_folder, model_name, register_resolvers, store_schemas
from lora_jax.experiment import CAUSAL_TASKS, git_commit
from lora_jax.models.hub import from_pretrained

register_resolvers()
store_schemas(ConfigStore.instance())


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    if cfg.task not in CAUSAL_TASKS:
        print(f"error: the few-shot floor is for task=e2e, got task={cfg.task}; add +exp=e2e_smollm2.", file=sys.stderr)
        sys.exit(2)
    OmegaConf.resolve(cfg)
    decode = decode_config(cfg)
    run, out_dir = cfg.run, Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    module, params, tokenizer, _ = from_pretrained(
        model_folder(cfg.model.name_or_path), task="causal-lm", dtype=jnp.dtype(cfg.model.dtype),
        param_dtype=jnp.dtype(cfg.model.param_dtype),
    )  # fmt: skip
    scores = causal_lm.fewshot(module, params, tokenizer, cfg.data.dir or os.environ.get("LORA_JAX_E2E_DIR"), decode,
                               out_dir, batch_size=cfg.optim.eval_batch_size, seed=cfg.seed)  # fmt: skip
    record = {k: v for k, v in scores.items() if k not in ("decoded", "samples")}
    summary = {
        "exp": cfg.exp_name, "task": cfg.task, "run": run, "seed": cfg.seed, "method": "fewshot",
        "main_metric": causal_lm.MAIN_METRIC, "best": record[causal_lm.MAIN_METRIC], "best_epoch": 0,
        "history": [{"step": 0, "epoch": 0, **record}], "trainable_params": 0, "shots": decode.shots,
        "model": model_name(cfg.model.name_or_path), "outputs": f"{decode.split}_outputs.txt",
        "git_commit": git_commit(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }  # fmt: skip
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(", ".join(f"{k}={v:.4f}" for k, v in record.items()), f"-> {out_dir}")


if __name__ == "__main__":
    if not any(arg.startswith("run=") for arg in sys.argv[1:]):  # the run folder (and Hydra's) is named for the floor
        sys.argv.append("run=fewshot_k${generate.shots}_seed${seed}")
    main()
