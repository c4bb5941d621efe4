"""Quantized frozen bases (QLoRA): the formats against their definitions and oracles, and LoRA training over them."""

from __future__ import annotations

import dataclasses
import functools

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.stats import norm

from lora_jax import quant
from lora_jax.adapters import TENSORS, load_adapter, save_adapter
from lora_jax.lora import LoraConfig, LoraError, lora_params, lora_wrap, merge
from lora_jax.methods import count_params, lora_optimizer, partition, trainable_mask, unpartition
from lora_jax.models import bert, hub
from lora_jax.tree import leaf_paths
from tests.test_lora import perturb_lora_b

# QLoRA paper (arXiv 2305.14314), Appendix E: the NF4 data type's 16 values.
PAPER_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip
METHODS = ("nf4", "int8", "q8_0", "q4_1")
TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip


def _weights(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# The formats
# ---------------------------------------------------------------------------------------------------------------


def test_nf4_code_book_is_the_papers_normal_float():
    np.testing.assert_array_equal(quant.NF4_CODE, np.float32(PAPER_NF4))
    # Its construction (QLoRA section 3): N(0, 1) quantiles, 8 positive and 7 negative halves of an asymmetric
    # grid with an exact zero, normalised to [-1, 1].
    offset = 0.9677083
    positive = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    negative = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    values = np.sort(np.concatenate([positive, [0.0], negative]))
    np.testing.assert_allclose(quant.NF4_CODE, values / values.max(), atol=1e-6)


@pytest.mark.parametrize("shape", [(48, 80), (33, 7)])  # (33, 7): the last block is partial
def test_nf4_rounds_every_weight_to_the_nearest_code_of_its_block(shape):
    kernel = _weights(shape)
    kernel[0, :3] = 0.0
    q = quant.NF4.quantize(kernel, double_quant=False)
    out = np.asarray(q.dequantize())
    assert out.shape == shape and out.dtype == np.float32
    flat, deq = kernel.T.reshape(-1), out.T.reshape(-1)  # blocks run along the torch weight's rows
    for start in range(0, flat.size, 64):
        block, got = flat[start : start + 64], deq[start : start + 64]
        absmax = np.abs(block).max()
        nearest = quant.NF4_CODE[np.abs(block[:, None] / absmax - quant.NF4_CODE[None]).argmin(axis=1)]
        np.testing.assert_allclose(got, nearest * absmax, rtol=1e-6, atol=1e-7)
        gap = np.diff(quant.NF4_CODE).max()
        assert np.abs(got - block).max() <= gap / 2 * absmax * (1 + 1e-6)
    assert (out[0, :3] == 0).all()


def test_double_quantization_stores_the_absmax_in_8_bits_with_a_bounded_error():
    kernel = _weights((256, 512))  # 2048 blocks of 64: 8 absmax blocks of 256
    single = quant.NF4.quantize(kernel, double_quant=False)
    double = quant.NF4.quantize(kernel)
    assert double.absmax.dtype == jnp.uint8 and double.absmax_scale.shape == (8,)
    bits = lambda q: 8 * q.nbytes / kernel.size
    assert bits(single) == 4.5 and bits(double) < 4.13  # QLoRA: 0.5 -> 0.127 bits per parameter
    true = np.asarray(single.absmax)
    got = np.asarray(double.block_absmax())
    centred = (true - true.mean()).reshape(8, 256)
    bound = np.diff(quant.DYNAMIC_CODE).max() / 2 * np.abs(centred).max(axis=1)
    assert (np.abs(got - true).reshape(8, 256) <= bound[:, None] * (1 + 1e-5)).all()
    assert np.abs(got - true).max() > 0  # the absmax really is quantized
    rel = np.abs(np.asarray(double.dequantize()) - np.asarray(single.dequantize())).max() / np.abs(kernel).max()
    assert rel < 0.01


def test_nf4_equals_bitsandbytes():
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes.functional")
    np.testing.assert_allclose(quant.DYNAMIC_CODE, bnb.create_dynamic_map(signed=True).numpy(), rtol=1e-6, atol=0)
    weight = _weights((80, 424), seed=3)  # torch layout (d_out, d_in); 530 blocks, the last one partial
    for double in (False, True):
        packed, state = bnb.quantize_4bit(
            torch.from_numpy(weight), blocksize=64, quant_type="nf4", compress_statistics=double
        )
        reference = bnb.dequantize_4bit(packed, state).numpy().T
        ours = quant.NF4.quantize(weight.T, double_quant=double)
        np.testing.assert_array_equal(np.asarray(ours.codes)[: packed.numel()], packed.numpy().reshape(-1))
        if not double:  # bitsandbytes' values to the bit
            np.testing.assert_array_equal(np.asarray(ours.dequantize()), reference)
            continue
        # The mean subtracted from the absmax values is a float32 sum in another order (torch's), and 22 of the
        # dynamic code's 256 values differ in their last bit (float32 linspace): an absmax within ~1e-6 of a
        # rounding midpoint may take the neighbouring 8-bit code. Every other block is bitsandbytes' own.
        codes, theirs = np.asarray(ours.absmax).astype(int), state.absmax.numpy().astype(int)
        assert np.abs(codes - theirs).max() <= 1 and (codes != theirs).mean() < 0.02
        same = np.repeat(codes == theirs, 64)[: weight.size].reshape(weight.shape).T
        np.testing.assert_allclose(np.asarray(ours.dequantize())[same], reference[same], rtol=2e-6, atol=1e-7)


def test_int8_error_is_at_most_half_a_step_per_output_channel():
    kernel = _weights((40, 24)) * np.linspace(0.1, 10, 24, dtype=np.float32)
    q = quant.Int8.quantize(kernel)
    assert q.values.dtype == jnp.int8 and q.scale.shape == (24,)
    error = np.abs(np.asarray(q.dequantize()) - kernel)
    step = np.abs(kernel).max(axis=0) / 127
    assert (error <= step / 2 * (1 + 1e-5)).all()
    np.testing.assert_allclose(np.abs(np.asarray(q.dequantize())).max(axis=0), np.abs(kernel).max(axis=0), rtol=1e-6)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_1"])
def test_gguf_blocks_dequantize_exactly_as_the_gguf_package_and_are_kept_unchanged(name):
    qtype = getattr(gguf.GGMLQuantizationType, name)
    weight = _weights((24, 96))  # torch layout
    raw = gguf.quants.quantize(weight, qtype)
    leaf = quant.from_gguf_blocks(name, raw, weight.shape)
    reference = gguf.quants.dequantize(raw, qtype).T
    assert leaf.shape == (96, 24)
    np.testing.assert_array_equal(np.asarray(leaf.dequantize()), reference)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda q: q.dequantize())(leaf)), reference)
    np.testing.assert_array_equal(leaf.to_blocks(), raw)  # no requantization: the file's bytes, as they were
    assert leaf.nbytes == raw.nbytes
    assert leaf.dequantize(jnp.bfloat16).dtype == jnp.bfloat16
    # quantize_params' ggml methods make the same blocks from a float kernel.
    np.testing.assert_array_equal(quant.quantize(weight.T, name.lower()).to_blocks(), raw)
    for wrong in [(24, 100), (12, 96)]:
        with pytest.raises(quant.QuantError, match="wrong shape or type"):
            quant.from_gguf_blocks(name, raw, wrong)


@pytest.mark.parametrize("method, shape", [*((m, (64, 50)) for m in METHODS), ("nf4", (48, 7))])
def test_rows_are_the_dequantized_kernels_columns(method, shape):
    """`rows` is an embedding lookup on the torch-layout weight; (48, 7) has nf4 blocks straddling rows."""
    kernel = quant.quantize(_weights(shape), method)
    ids = jnp.asarray([[3, 0, 49 % shape[1]], [1, 1, 2]])
    expected = jnp.take(kernel.dequantize().T, ids, axis=0)
    np.testing.assert_array_equal(np.asarray(jax.jit(kernel.rows)(ids)), np.asarray(expected))


@functools.cache
def _tiny_llama():
    from lora_jax.models import llama

    config = llama.Config(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, tie_word_embeddings=True,
    )  # fmt: skip
    module = llama.build(config, "causal-lm")
    ids = jax.random.randint(jax.random.key(1), (2, 7), 0, 96)
    params = jax.jit(module.init)(jax.random.key(0), ids)["params"]
    return module, params, (ids, jnp.ones_like(ids).at[1, 5:].set(0))


@pytest.mark.parametrize("method", METHODS)
def test_a_quantized_tied_table_serves_lookup_and_lm_head_as_its_dequantized_copy(method):
    module, params, batch = _tiny_llama()
    lora = LoraConfig(r=4, alpha=8, targets="all-linear")
    wrapped = perturb_lora_b(lora_wrap(params, lora, jax.random.key(2)))
    ours = quant.quantize_params(wrapped, method, embeddings=("model.embed_tokens",))
    table = ours["model"]["embed_tokens"]["embedding"]
    assert isinstance(table, quant.Table) and table.shape == (96, 64)
    if method == "nf4":
        assert quant.base_bytes(ours) < 0.3 * quant.base_bytes(wrapped)
    logits = jax.jit(_logits, static_argnums=0)
    reference = logits(module, quant.dequantize_params(ours), batch)
    np.testing.assert_allclose(logits(module, ours, batch), reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())

    def loss(trainable):
        return _logits(module, unpartition(trainable, frozen), batch).sum()

    trainable, frozen = partition(ours, trainable_mask(ours, lora))
    grads = jax.jit(jax.grad(loss))(trainable)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads)) and any(np.abs(g).max() > 0 for g in
                                                                             jax.tree.leaves(grads))  # fmt: skip
    assert not any(quant.is_quantized(x) for x in jax.tree.leaves(trainable, is_leaf=quant.is_quantized))


def test_quantize_embedding_needs_a_method(tmp_path):
    with pytest.raises(ValueError, match="needs a quantize method"):
        hub.from_pretrained(tmp_path, "causal-lm", quantize_embedding=True)


def test_llama_qk_order_undoes_llama_cpp_permutation_on_whole_block_rows():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    n_heads, n_kv, head_dim, d_in = 4, 2, 8, 64
    undo = LlamaTensorProcessor({"num_attention_heads": n_heads, "num_key_value_heads": n_kv})
    for heads, name in ((n_heads, "blk.0.attn_q.weight"), (n_kv, "blk.0.attn_k.weight")):
        weight = _weights((heads * head_dim, d_in))
        expected = undo.process(weight, name).weights
        order = quant.llama_qk_order(weight.shape[0], heads)
        np.testing.assert_array_equal(weight[order], expected)
        raw = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q4_1)
        leaf = quant.reorder_outputs(quant.from_gguf_blocks("Q4_1", raw, weight.shape), order)
        deq = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_1)
        np.testing.assert_array_equal(np.asarray(leaf.dequantize()), deq[order].T)
        np.testing.assert_array_equal(quant.reorder_outputs(weight.T, order), expected.T)


def test_bad_requests_are_refused_with_a_fix():
    with pytest.raises(quant.QuantError, match="choose one of"):
        quant.quantize_params({"d": {"kernel": np.ones((4, 4))}}, "nf3")
    with pytest.raises(quant.QuantError, match="gguf.quants.dequantize"):
        quant.from_gguf_blocks("Q6_K", np.zeros(210, np.uint8), (1, 256))


# ---------------------------------------------------------------------------------------------------------------
# LoRA over a quantized base
# ---------------------------------------------------------------------------------------------------------------


@functools.cache
def _tiny_bert():
    config = bert.Config(model_type="roberta", pad_token_id=1, num_labels=3, **TINY)
    module = bert.build(config, "sequence-classification")
    ids = jax.random.randint(jax.random.key(1), (2, 9), 3, 100)
    mask = jnp.ones_like(ids).at[1, 6:].set(0)
    params = jax.jit(module.init)(jax.random.key(0), ids, mask)["params"]
    return config, module, params, (ids, mask)


def _lora_base(method, targets=("query", "value"), **kw):
    config, module, params, batch = _tiny_bert()
    lora = LoraConfig(r=4, alpha=8, targets=targets, train_also=("classifier",), exclude=("classifier.*",))
    wrapped = perturb_lora_b(lora_wrap(params, lora, jax.random.key(2)))
    return module, quant.quantize_params(wrapped, method, **kw), lora, batch


def _logits(module, params, batch):
    return module.apply({"params": params}, *batch)["logits"]


@pytest.mark.parametrize("method", METHODS)
def test_quantized_base_forward_equals_the_dequantized_forward(method):
    module, params, _, batch = _lora_base(method, targets="all-linear")
    kernels = [p for p, leaf in leaf_paths(params) if quant.is_quantized(leaf)]
    assert len(kernels) == 2 * 6 and not any("classifier" in p for p in kernels)  # 6 per layer
    assert all(not quant.is_quantized(leaf) for p, leaf in leaf_paths(params) if "lora_" in p or "embed" in p)
    logits = jax.jit(_logits, static_argnums=0)
    ours, reference = logits(module, params, batch), logits(module, quant.dequantize_params(params), batch)
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


def _dot_operand_dtypes(jaxpr) -> list[tuple]:
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _dot_operand_dtypes(inner)
    return found


def test_bfloat16_compute_runs_every_matmul_on_bfloat16_operands_over_an_nf4_base():
    config, _, params, batch = _tiny_bert()
    module = bert.build(dataclasses.replace(config, dtype=jnp.bfloat16), "sequence-classification")
    lora = LoraConfig(r=4, targets=("query", "value"))
    qparams = perturb_lora_b(quant.quantize_params(lora_wrap(params, lora, jax.random.key(2)), "nf4"))
    dtypes = _dot_operand_dtypes(jax.make_jaxpr(lambda p: _logits(module, p, batch))(qparams).jaxpr)
    assert len(dtypes) >= 2 * (6 + 2 * 2 + 2)  # 6 kernels, 2 LoRA pairs, 2 attention products per layer
    assert set(dtypes) == {("bfloat16", "bfloat16")}
    logits = jax.jit(_logits, static_argnums=0)
    out = logits(module, qparams, batch)
    reference = np.asarray(logits(_tiny_bert()[1], quant.dequantize_params(qparams), batch))
    assert np.abs(np.asarray(out, np.float32) - reference).max() < 0.05 * np.abs(reference).max()


def _loss(module, params, batch):
    labels = jnp.array([0, 2])
    return optax.softmax_cross_entropy_with_integer_labels(_logits(module, params, batch), labels).mean()


def test_gradients_reach_only_lora_and_no_float_kernel_is_kept_for_the_backward_pass():
    module, params, lora, batch = _lora_base("nf4")
    trainable, frozen = partition(params, trainable_mask(params, lora))
    names = {p.rsplit(".", 1)[-1] for p, x in leaf_paths(trainable) if x is not None}
    assert names == {"lora_a", "lora_b", "kernel", "bias"}  # kernel/bias: the classifier (train_also)
    assert not any(quant.is_quantized(x) for _, x in leaf_paths(trainable))
    grads = jax.grad(lambda t: _loss(module, unpartition(t, frozen), batch))(trainable)
    for path, g in leaf_paths(grads):
        assert "classifier" in path or path.rsplit(".", 1)[-1] in ("lora_a", "lora_b"), path
        assert np.abs(np.asarray(g)).max() > 0, path

    # What the backward pass keeps from the forward pass (the vjp's residuals): never a dequantized kernel.
    kernels = [np.asarray(x.dequantize()) for _, x in leaf_paths(params) if quant.is_quantized(x)]

    def kept_kernels(trainable, frozen):
        residuals = jax.jit(lambda t: jax.vjp(lambda t: _loss(module, unpartition(t, frozen), batch), t)[1])(
            trainable
        )
        return [
            x for x in jax.tree.leaves(residuals) if any(x.shape == k.shape and np.array_equal(x, k) for k in kernels)
        ]

    assert not kept_kernels(trainable, frozen)
    # A float base keeps them (so the check is not vacuous).
    float_params = quant.dequantize_params(params)
    assert kept_kernels(*partition(float_params, trainable_mask(float_params, lora)))


def test_quantized_kernels_never_train():
    module, params, lora, _ = _lora_base("int8")
    with pytest.raises(LoraError, match="quantized and cannot train"):
        partition(params, trainable_mask(params, LoraConfig(targets=("query",), train_also=("query",))))
    assert count_params(params, lora) == count_params(quant.dequantize_params(params), lora)


def test_adapter_trained_over_an_nf4_base_saves_and_loads_like_any_other(tmp_path):
    module, params, lora, batch = _lora_base("nf4")
    tx = lora_optimizer(optax.adam(1e-2), params, lora)
    state = tx.init(params)
    assert not any(quant.is_quantized(x) for x in jax.tree.leaves(state, is_leaf=quant.is_quantized))
    trainable, frozen = partition(params, trainable_mask(params, lora))

    inner = optax.adam(1e-2)
    opt = inner.init(trainable)

    @jax.jit
    def step(trainable, opt):
        loss, grads = jax.value_and_grad(lambda t: _loss(module, unpartition(t, frozen), batch))(trainable)
        updates, opt = inner.update(grads, opt, trainable)
        return optax.apply_updates(trainable, updates), opt, loss

    losses = []
    for _ in range(3):
        trainable, opt, loss = step(trainable, opt)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    trained = unpartition(trainable, frozen)

    save_adapter(tmp_path, trained, lora)
    from safetensors.numpy import load_file

    saved = load_file(str(tmp_path / TENSORS))
    assert all("lora_" in k or k.startswith("classifier") for k in saved)
    assert (tmp_path / TENSORS).stat().st_size < 64 * 1024  # the base is not in it
    base = quant.quantize_params(_tiny_bert()[2], "nf4")
    loaded, config = load_adapter(tmp_path, base)
    assert config == lora
    np.testing.assert_array_equal(_logits(module, loaded, batch), _logits(module, trained, batch))
    # The same adapter goes onto the float base too.
    loaded_float, _ = load_adapter(tmp_path, _tiny_bert()[2])
    jax.tree.map(np.testing.assert_array_equal, lora_params(loaded_float), lora_params(trained))


def test_merge_refuses_a_quantized_base_and_merges_into_a_float_copy_on_request():
    module, params, _, batch = _lora_base("nf4")
    with pytest.raises(LoraError, match=r"is quantized \(NF4\).*dequantize"):
        merge(params)
    merged = merge(params, dequantize=True)
    assert not any("lora_" in p for p, _ in leaf_paths(merged))
    kinds = {p: quant.is_quantized(x) for p, x in leaf_paths(merged) if p.endswith("kernel")}
    assert not any(q for p, q in kinds.items() if p.endswith(("query.kernel", "value.kernel")))
    assert any(kinds.values())  # kernels without an adapter stay as they were
    np.testing.assert_allclose(_logits(module, merged, batch), _logits(module, params, batch), rtol=1e-5, atol=1e-6)


def test_from_pretrained_quantizes_on_load(tmp_path):
    config, _, params, batch = _tiny_bert()
    hub.to_pretrained(config, params, tmp_path, "sequence-classification")
    module, qparams, _, _ = hub.from_pretrained(tmp_path, "sequence-classification", quantize="q8_0")
    assert quant.is_quantized(qparams["roberta"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"])
    assert not quant.is_quantized(qparams["classifier"]["dense"]["kernel"])
    reference = _logits(module, params, batch)
    np.testing.assert_allclose(_logits(module, qparams, batch), reference, atol=0.02 * np.abs(reference).max())


@pytest.mark.slow
def test_the_training_loop_runs_checkpoints_and_resumes_over_an_nf4_base(tmp_path):
    from lora_jax.train import EvalSpec, TrainConfig, train

    module, params, lora, _ = _lora_base("nf4")
    rng = np.random.default_rng(0)
    data = {
        "input_ids": rng.integers(3, 100, (16, 9)).astype(np.int32),
        "attention_mask": np.ones((16, 9), np.int32),
        "labels": rng.integers(0, 3, 16).astype(np.int32),
    }
    spec = EvalSpec(3, lambda logits, labels: {"accuracy": float((logits.argmax(-1) == labels).mean())}, "accuracy")
    config = TrainConfig(epochs=1, batch_size=8, eval_batch_size=8, lr=1e-2, progress=False)
    fresh = lambda: jax.tree.map(jnp.copy, params)  # train() donates the trainable half's buffers
    summary = train(module, fresh(), data, {"validation": data}, spec, config, tmp_path, lora)
    assert summary["steps"] == 2 and summary["best"] is not None
    assert summary["total_params"] == count_params(quant.dequantize_params(params), lora).total
    adapter, _ = load_adapter(tmp_path / "adapter", params)
    assert not np.array_equal(adapter["classifier"]["out_proj"]["kernel"], params["classifier"]["out_proj"]["kernel"])
    # A second run over the same folder resumes from the latest checkpoint (trainable half + optimizer state).
    longer = dataclasses.replace(config, epochs=2)
    again = train(module, fresh(), data, {"validation": data}, spec, longer, tmp_path, lora)
    assert again["steps"] == 4 and len(again["history"]) == 2
