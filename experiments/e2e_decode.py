"""Decode a trained E2E run on a whole split and score it: the evaluation a run itself may have cut short
(`generate.max_mrs`) or decoded under other settings, resumable batch by batch (a beam-10 pass over the 630 test
MRs takes minutes to an hour on CPU).

    python experiments/e2e_decode.py +exp=e2e_smollm2 +from_run=<run folder> results_dir=/work/e2e-runs

The trained run's model (its config.yaml: method, LoRA / adapter / prefix settings) with its best weights: a LoRA
run's exported adapter (<run folder>/adapter), any other method's best checkpoint (<run folder>/checkpoints/best:
full fine-tuning, adapters, prefix tuning, FT-Top2). Decoding settings and scorer are this command's `generate.*`
(`generate.max_mrs` unset scores every MR). Writes <results_dir>/<exp>/e2e/<that run>_decoded/: config.yaml (the
trained run's, with this command's `generate`), summary.json (the layout experiments/tables.py reads),
metrics.jsonl, <split>_outputs.txt, and batches/ (each decoded batch, written atomically; a rerun of the same
command skips the batches already there).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import hydra
import jax
import jax.numpy as jnp
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from lora_jax import causal_lm
from lora_jax.adapters import load_adapter
from lora_jax.checkpoint import RunCheckpoints
from lora_jax.config import decode_config, model_folder, model_name, register_resolvers, store_schemas
from lora_jax.data import e2e
from lora_jax.data.prefix import insert_special_causal
from lora_jax.experiment import CAUSAL_TASKS, build_model, git_commit, special_tokens
from lora_jax.methods import partition, trainable_mask, unpartition
from lora_jax.models.hub import from_pretrained

register_resolvers()
store_schemas(ConfigStore.instance())


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    if cfg.task not in CAUSAL_TASKS or not cfg.get("from_run"):
        print("error: decode a trained E2E run: add +exp=e2e_smollm2 +from_run=<its run folder>.", file=sys.stderr)
        sys.exit(2)
    OmegaConf.resolve(cfg)
    trained_dir = Path(cfg.from_run)
    method = json.loads((trained_dir / "summary.json").read_text()).get("method")
    from_adapter = method == "lora" and (trained_dir / "adapter").is_dir()
    if not from_adapter and not (trained_dir / "checkpoints" / "best").is_dir():
        print(f"error: {trained_dir} has neither a LoRA adapter/ nor checkpoints/best; decode the folder its training "
              "wrote (copies under results/ keep neither).", file=sys.stderr)  # fmt: skip
        sys.exit(2)
    decode = decode_config(cfg)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trained_cfg = OmegaConf.load(trained_dir / "config.yaml")
    decode_cfg = OmegaConf.merge(trained_cfg, {"generate": cfg.generate, "run": cfg.run, "out_dir": cfg.out_dir})
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(decode_cfg))
    if from_adapter:  # the base exactly as the run trained on it (a QLoRA run's quantized base too)
        model = trained_cfg.model
        module, base, tokenizer, _ = from_pretrained(
            model_folder(model.name_or_path), task="causal-lm", dtype=jnp.dtype(model.dtype),
            param_dtype=jnp.dtype(model.param_dtype), quantize=model.get("quantize"),
            quantize_embedding=bool(model.get("quantize_embedding", False)),
        )  # fmt: skip
        params, _ = load_adapter(trained_dir / "adapter", base)
        special = None
    else:  # the run's own model, its trainable half from the best checkpoint
        module, params, tokenizer, model_config, lora, _ = build_model(trained_cfg, None)
        special = special_tokens(trained_cfg, model_config)
        trainable, frozen = partition(params, trainable_mask(params, lora, method))
        params = unpartition(RunCheckpoints(trained_dir / "checkpoints").restore_best(trainable), frozen)
    data_dir = cfg.data.dir or os.environ.get("LORA_JAX_E2E_DIR")
    grouped = causal_lm.eval_references(data_dir, decode)
    prompts = e2e.tokenize_prompts(grouped.mrs, tokenizer)
    if special is not None:
        prompts = insert_special_causal(prompts, special, e2e.pad_id(tokenizer))
    dataset = causal_lm.prompt_set(prompts)
    generate_batch = causal_lm.decoder(decode, [e2e.end_of_text_id(tokenizer)], e2e.pad_id(tokenizer))
    generate = jax.jit(lambda p, b: generate_batch(module, p, b))
    tokens = causal_lm.decode_all(generate, params, dataset, cfg.optim.eval_batch_size, keep=out_dir / "batches")
    scores = causal_lm.scorer(grouped, tokenizer, decode.samples)(tokens, dataset["labels"])
    (out_dir / f"{decode.split}_outputs.txt").write_text("\n".join(scores["decoded"]) + "\n")
    record = {k: v for k, v in scores.items() if k not in ("decoded", "samples")}
    (out_dir / "metrics.jsonl").write_text(json.dumps({"step": 0, "epoch": 0, **record,
                                                        "samples": scores["samples"]}) + "\n")  # fmt: skip
    trained = json.loads((trained_dir / "summary.json").read_text())
    summary = {
        "exp": cfg.exp_name, "task": cfg.task, "run": cfg.run, "seed": trained.get("seed"), "method": method,
        "main_metric": causal_lm.MAIN_METRIC, "best": record[causal_lm.MAIN_METRIC], "best_epoch": 0,
        "history": [{"step": 0, "epoch": 0, **record}], "trainable_params": trained.get("trainable_params"),
        "lora": trained.get("lora"), "adapter": trained.get("adapter"), "mrs": len(grouped.mrs),
        "decoded_from": trained_dir.name, "train_rows": trained.get("train_rows"),
        "model": model_name(trained_cfg.model.name_or_path), "outputs": f"{decode.split}_outputs.txt",
        "git_commit": git_commit(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }  # fmt: skip
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(", ".join(f"{k}={v:.4f}" for k, v in record.items()), f"-> {out_dir}")


if __name__ == "__main__":
    if not any(arg.startswith("run=") for arg in sys.argv[1:]):  # named for the run whose adapter it decodes
        trained = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("+from_run=")), "run")
        sys.argv.append(f"run={Path(trained).resolve().name}_decoded")
    main()
