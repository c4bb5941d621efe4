"""How long an E2E run of a config will take here: time a few real training steps and the beam decoding of a few MRs.

    python experiments/e2e_probe.py +exp=e2e_smollm2 [+probe.steps=8] [+probe.mrs=20]

Builds the run exactly as experiments/run.py does (model, LoRA, `causal_lm.e2e_datasets`, `train.prepare`), then
prints seconds per training step (the first step at each batch length includes its compile) and seconds per decoded
MR at the config's beam settings; what `data.train_examples` and `generate.max_mrs` in conf/exp/e2e_smollm2.yaml were
sized from. Nothing is written.
"""

from __future__ import annotations

import time

import hydra
import jax
import jax.numpy as jnp
import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf, open_dict

from lora_jax import causal_lm
from lora_jax.config import (
    decode_config,
    lora_config_for,
    model_folder,
    register_resolvers,
    store_schemas,
    train_config,
)
from lora_jax.data import e2e
from lora_jax.data.batching import epoch_batches, eval_batches
from lora_jax.lora import lora_wrap
from lora_jax.models.hub import from_pretrained
from lora_jax.models.spec import family_of
from lora_jax.sharding import make_mesh, place_batch
from lora_jax.train import prepare

register_resolvers()
store_schemas(ConfigStore.instance())


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    with open_dict(cfg):
        probe = {"steps": 8, "mrs": 20, **(OmegaConf.to_container(cfg.get("probe")) or {})}
        cfg.generate.max_mrs = probe["mrs"]
    OmegaConf.resolve(cfg)
    config, decode = train_config(cfg), decode_config(cfg)
    module, params, tokenizer, model_config = from_pretrained(
        model_folder(cfg.model.name_or_path), task="causal-lm", dtype=jnp.dtype(cfg.model.dtype)
    )
    lora = lora_config_for(cfg, getattr(model_config, "model_type", None) or family_of(model_config).model_types[0])
    if cfg.method == "lora":
        params = lora_wrap(params, lora, jax.random.key(cfg.seed))
    train_set, eval_sets, spec, buckets = causal_lm.e2e_datasets(cfg.data, decode, tokenizer)
    lengths = train_set["attention_mask"].sum(axis=1)
    print(f"{len(lengths)} training rows, buckets {buckets}, padding "
          f"{e2e.padding_fraction(lengths, config.batch_size, buckets):.3f}")  # fmt: skip
    mesh = make_mesh()
    prepared = prepare(module, params, config, 0, 1000, mesh, lora, spec.generate)
    state = prepared.state
    for i, batch in enumerate(epoch_batches(train_set, config.batch_size, config.seed, 0, buckets=buckets)):
        if i >= probe["steps"]:
            break
        tick = time.perf_counter()
        state, loss = prepared.train_step(state, prepared.frozen, place_batch(batch, mesh))
        seconds = time.perf_counter() - tick
        print(f"step {i}: length {batch['input_ids'].shape[1]}, {seconds:.1f} s, loss {float(loss):.3f}")
    dataset = next(iter(eval_sets.values()))
    for batch in eval_batches(dataset, config.eval_batch_size):
        tick = time.perf_counter()
        np.asarray(prepared.eval_step(state.trainable, prepared.frozen, place_batch(batch, mesh)))
        real = int(batch["weights"].sum())
        print(f"decode {real} MRs (beam {decode.num_beams}): {(time.perf_counter() - tick) / real:.1f} s per MR")


if __name__ == "__main__":
    main()
