"""Decode with a causal LM from the command line: `python -m lora_jax.generate <model> --prompt "..." [--chat]`.

<model> is anything `lora_jax.models.hub.from_pretrained` loads (an HF folder or hub id). With --chat the prompt
goes through the tokenizer's chat template as one user turn. Several --prompt flags decode as one left-padded
batch. The decoding options are transformers' `generate` names (lora_jax.models.generate).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.models import hub
from lora_jax.models.generate import generate


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lora_jax.generate", description=__doc__.splitlines()[0])
    p.add_argument("model", help="model folder, hub id or file that lora_jax.models.hub.from_pretrained loads")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--system", default=None, help="a system message before the user turn (with --chat)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--no-repeat-ngram-size", type=int, default=0)
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", help="compute dtype, e.g. bfloat16")
    return p.parse_args(argv)


def prompt_texts(tokenizer: Any, prompts: Sequence[str], chat: bool, system: str | None) -> list[str]:
    if not chat:
        return list(prompts)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template; drop --chat or use an instruction-tuned model's folder.")
    head = [{"role": "system", "content": system}] if system else []
    return [
        tokenizer.apply_chat_template(
            [*head, {"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]


def main(argv: Sequence[str] | None = None) -> list[str]:
    """Decode the prompts, print each answer, and return them."""
    args = parse_args(argv)
    module, params, tokenizer, config = hub.from_pretrained(args.model, task="causal-lm", dtype=jnp.dtype(args.dtype))
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer files; save the tokenizer beside the weights.")
    texts = prompt_texts(tokenizer, args.prompt, args.chat, args.system)
    tokenizer.padding_side = "left"
    eos = {tokenizer.eos_token_id, *np.atleast_1d(getattr(config, "eos_token_id", None) or []).tolist()} - {None}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = pad
    # A chat template already starts with the special tokens it wants.
    batch = tokenizer(texts, return_tensors="np", padding=True, add_special_tokens=not args.chat)
    family = hub.family_of(config)
    if family.causal_lm is None:
        raise ValueError(f"{args.model} is a {family.name} model, which does not decode as a causal LM; use a decoder.")
    tokens = generate(
        family.causal_lm(module), params, batch["input_ids"], batch["attention_mask"],
        max_new_tokens=args.max_new_tokens, eos_token_id=sorted(eos) or None, pad_token_id=pad,
        do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        num_beams=args.num_beams, length_penalty=args.length_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size, rng=jax.random.key(args.seed),
    )  # fmt: skip
    answers = tokenizer.batch_decode(np.asarray(tokens), skip_special_tokens=True)
    for answer in answers:
        print(answer.strip())
    return answers


if __name__ == "__main__":
    main()
