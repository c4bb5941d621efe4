"""Frozen kernels held quantized: QLoRA's NF4, per-channel int8, and GGUF's Q8_0/Q4_1 blocks as the file has them.

A quantized kernel is a pytree node (its packed arrays are the children, its logical shape and dtype static) that
the path helpers of `lora_jax.tree` treat as one leaf, standing where the float `kernel` stood. The LoRA-aware
Dense calls `matmul`, which dequantizes inside the traced step and recomputes the dequantization in the backward
pass, so no float copy of a frozen weight outlives its matmul (QLoRA, Dettmers et al. 2023, arXiv 2305.14314).
LoRA leaves beside a quantized kernel take its logical shape and dtype.

Blockwise formats (nf4, q8_0, q4_1) block along the torch weight's rows (d_out rows of d_in values, as
bitsandbytes and ggml do), so a weight quantizes to the same blocks here as in PEFT+bitsandbytes or llama.cpp;
`dequantize` returns the Flax kernel (d_in, d_out), the transpose.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lora_jax.tree import Params, PathLeaf, map_with_path, matches_leaf

METHODS = ("nf4", "int8", "q8_0", "q4_1")
DEFAULT_EXCLUDE = ("classifier", "lm_head", "score")

# QLoRA's 4-bit NormalFloat code book (arXiv 2305.14314, Appendix E): quantiles of N(0, 1) scaled to [-1, 1],
# with an exact zero.
NF4_CODE = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0],
    np.float32,
)  # fmt: skip


def dynamic_code() -> np.ndarray:
    """The 256 signed values of 8-bit dynamic tree quantization (Dettmers 2015), which QLoRA's double quantization
    uses for the absmax values: for each of 7 decades 10^-6..10^0, 2^i evenly spaced magnitudes, both signs,
    plus 0 and 1."""
    values = [0.0, 1.0]
    for i in range(7):
        edges = np.linspace(0.1, 1.0, 2**i + 1, dtype=np.float32)
        mids = (edges[:-1] + edges[1:]) / 2
        values += [*(10.0 ** (i - 6) * mids), *(-(10.0 ** (i - 6)) * mids)]
    return np.sort(np.asarray(values, np.float32))


DYNAMIC_CODE = dynamic_code()


class QuantError(ValueError):
    """Bad quantization request; the message says how to fix it."""


class Quantized(PathLeaf):
    """What every quantized kernel offers: its logical `shape` and `dtype`, and `dequantize`."""

    shape: tuple[int, int]
    dtype: Any

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes actually held (the packed arrays), against size * itemsize for the float kernel."""
        return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(self))

    def dequantize(self, dtype: Any = None) -> jax.Array:
        raise NotImplementedError

    def rows(self, ids: jax.Array, dtype: Any = None) -> jax.Array:
        """Rows `ids` of the torch-layout weight (d_out, d_in), i.e. kernel columns, as (*ids.shape, d_in): what an
        embedding lookup reads. Formats whose blocks lie along those rows dequantize only the rows asked for."""
        return jnp.take(self.dequantize(dtype).T, ids, axis=0)


def is_quantized(x: Any) -> bool:
    return isinstance(x, Quantized)


# ---------------------------------------------------------------------------------------------------------------
# NF4 with double quantization (QLoRA)
# ---------------------------------------------------------------------------------------------------------------


def _blockwise_nearest(flat: np.ndarray, block: int, code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(code indices, per-block absmax) of `flat` normalised by each block's absmax, rounded to the nearest code
    value (a tie goes to the lower one, as bitsandbytes' bucketize does). The tail is padded with zeros."""
    blocks = np.pad(flat.astype(np.float32), (0, -len(flat) % block)).reshape(-1, block)
    absmax = np.abs(blocks).max(axis=1)
    scaled = np.clip(blocks * (np.float32(1.0) / np.maximum(absmax, np.float32(1e-38)))[:, None], -1, 1)
    return np.searchsorted((code[:-1] + code[1:]) / 2, scaled).astype(np.uint8), absmax


@struct.dataclass
class NF4(Quantized):
    """4-bit NormalFloat, one absmax per `block_size` values; with double quantization the absmax values are
    stored as 8-bit dynamic codes (blocks of `absmax_block_size`, after subtracting their mean), as QLoRA and
    bitsandbytes' `quantize_4bit(..., compress_statistics=True)` do: 4.127 bits per weight instead of 4.5."""

    codes: jax.Array  # uint8 (n_blocks * block_size / 2,): two code indices a byte, the first in the high nibble
    absmax: jax.Array  # float32 (n_blocks,), or uint8 dynamic codes when double-quantized
    absmax_scale: jax.Array | None  # float32 (ceil(n_blocks / absmax_block_size),); None without double quant
    absmax_offset: jax.Array | None  # float32 (), the mean subtracted before quantizing the absmax values
    shape: tuple[int, int] = struct.field(pytree_node=False)
    dtype: Any = struct.field(pytree_node=False)
    block_size: int = struct.field(pytree_node=False, default=64)
    absmax_block_size: int = struct.field(pytree_node=False, default=256)

    @classmethod
    def quantize(
        cls, kernel: Any, block_size: int = 64, double_quant: bool = True, absmax_block_size: int = 256
    ) -> NF4:
        kernel = np.asarray(kernel)
        codes, absmax = _blockwise_nearest(kernel.T.astype(np.float32).reshape(-1), block_size, NF4_CODE)
        packed = (codes.reshape(-1)[0::2] << 4) | codes.reshape(-1)[1::2]
        scale = offset = None
        if double_quant:
            offset = absmax.mean(dtype=np.float32)
            absmax_codes, scale = _blockwise_nearest(absmax - offset, absmax_block_size, DYNAMIC_CODE)
            absmax = absmax_codes.reshape(-1)[: len(absmax)]
            scale, offset = jnp.asarray(scale), jnp.asarray(offset)
        return cls(
            jnp.asarray(packed), jnp.asarray(absmax), scale, offset, tuple(kernel.shape), np.dtype(kernel.dtype),
            block_size, absmax_block_size,
        )  # fmt: skip

    def block_absmax(self, blocks: jax.Array | None = None) -> jax.Array:
        """The float32 absmax of every block, or of the blocks numbered `blocks` (double quantization undone)."""
        blocks = jnp.arange(self.absmax.shape[0]) if blocks is None else blocks
        if self.absmax_scale is None:
            return self.absmax[blocks]
        scale = self.absmax_scale[blocks // self.absmax_block_size]
        return jnp.asarray(DYNAMIC_CODE)[self.absmax[blocks]] * scale + self.absmax_offset

    def rows(self, ids: jax.Array, dtype: Any = None) -> jax.Array:
        d_in, d_out = self.shape
        if d_in % self.block_size:  # blocks straddle rows
            return super().rows(ids, dtype)
        per_row = d_in // self.block_size
        codes = self.codes.reshape(d_out, d_in // 2)[ids]
        indices = jnp.stack([codes >> 4, codes & 0xF], axis=-1).reshape(*ids.shape, per_row, self.block_size)
        absmax = self.block_absmax(ids[..., None] * per_row + jnp.arange(per_row))
        values = jnp.asarray(NF4_CODE)[indices] * absmax[..., None]
        return values.reshape(*ids.shape, d_in).astype(dtype or self.dtype)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        d_in, d_out = self.shape
        indices = jnp.stack([self.codes >> 4, self.codes & 0xF], axis=-1).reshape(-1, self.block_size)
        values = jnp.asarray(NF4_CODE)[indices] * self.block_absmax()[:, None]
        return values.reshape(-1)[: d_in * d_out].reshape(d_out, d_in).T.astype(dtype or self.dtype)


# ---------------------------------------------------------------------------------------------------------------
# int8, one absmax per output channel
# ---------------------------------------------------------------------------------------------------------------


@struct.dataclass
class Int8(Quantized):
    """Symmetric int8 with one scale (absmax / 127) per output channel: |error| <= scale / 2 everywhere."""

    values: jax.Array  # int8 (d_in, d_out), the Flax layout
    scale: jax.Array  # float32 (d_out,)
    shape: tuple[int, int] = struct.field(pytree_node=False)
    dtype: Any = struct.field(pytree_node=False)

    @classmethod
    def quantize(cls, kernel: Any) -> Int8:
        kernel = np.asarray(kernel)
        w = kernel.astype(np.float32)
        absmax = np.abs(w).max(axis=0)
        inverse = np.float32(127.0) / np.maximum(absmax, np.float32(1e-38))
        values = np.clip(np.rint(w * inverse), -127, 127).astype(np.int8)
        scale = (absmax / np.float32(127.0)).astype(np.float32)
        return cls(jnp.asarray(values), jnp.asarray(scale), tuple(kernel.shape), np.dtype(kernel.dtype))

    def dequantize(self, dtype: Any = None) -> jax.Array:
        return (self.values.astype(jnp.float32) * self.scale).astype(dtype or self.dtype)

    def rows(self, ids: jax.Array, dtype: Any = None) -> jax.Array:
        values = jnp.moveaxis(jnp.take(self.values, ids, axis=1), 0, -1).astype(jnp.float32)
        return (values * self.scale[ids][..., None]).astype(dtype or self.dtype)


# ---------------------------------------------------------------------------------------------------------------
# GGUF blocks, kept as the file stores them
# ---------------------------------------------------------------------------------------------------------------

GGUF_BLOCK = 32  # values per Q8_0 / Q4_1 block


@struct.dataclass
class Q8_0(Quantized):
    """ggml's Q8_0: per 32 values an fp16 scale d and 32 int8 q; value = q * d."""

    d: jax.Array  # float16 (d_out, d_in / 32)
    qs: jax.Array  # int8 (d_out, d_in / 32, 32)
    shape: tuple[int, int] = struct.field(pytree_node=False)
    dtype: Any = struct.field(pytree_node=False)

    BYTES = 34

    @classmethod
    def from_blocks(cls, blocks: np.ndarray, rows: int, dtype: Any) -> Q8_0:
        blocks = blocks.reshape(rows, -1, cls.BYTES)
        d = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]
        qs = np.ascontiguousarray(blocks[..., 2:]).view(np.int8)
        return cls(jnp.asarray(d), jnp.asarray(qs), (qs.shape[1] * GGUF_BLOCK, rows), np.dtype(dtype))

    def to_blocks(self) -> np.ndarray:
        """The raw bytes (d_out, n_blocks * 34), as ggml stores them."""
        d = np.asarray(self.d)[..., None].view(np.uint8)
        return np.concatenate([d, np.asarray(self.qs).view(np.uint8)], axis=-1).reshape(self.shape[1], -1)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        w = self.qs.astype(jnp.float32) * self.d.astype(jnp.float32)[..., None]
        return w.reshape(self.shape[1], self.shape[0]).T.astype(dtype or self.dtype)

    def rows(self, ids: jax.Array, dtype: Any = None) -> jax.Array:
        w = self.qs[ids].astype(jnp.float32) * self.d[ids].astype(jnp.float32)[..., None]
        return w.reshape(*ids.shape, self.shape[0]).astype(dtype or self.dtype)


@struct.dataclass
class Q4_1(Quantized):
    """ggml's Q4_1: per 32 values an fp16 scale d, an fp16 minimum m and 16 bytes of 4-bit q (values 0-15 in the
    low nibbles, 16-31 in the high ones); value = d * q + m."""

    d: jax.Array  # float16 (d_out, d_in / 32)
    m: jax.Array  # float16 (d_out, d_in / 32)
    qs: jax.Array  # uint8 (d_out, d_in / 32, 16)
    shape: tuple[int, int] = struct.field(pytree_node=False)
    dtype: Any = struct.field(pytree_node=False)

    BYTES = 20

    @classmethod
    def from_blocks(cls, blocks: np.ndarray, rows: int, dtype: Any) -> Q4_1:
        blocks = blocks.reshape(rows, -1, cls.BYTES)
        d = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0]
        m = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0]
        qs = np.ascontiguousarray(blocks[..., 4:])
        return cls(jnp.asarray(d), jnp.asarray(m), jnp.asarray(qs), (qs.shape[1] * GGUF_BLOCK, rows), np.dtype(dtype))

    def to_blocks(self) -> np.ndarray:
        d, m = (np.asarray(x)[..., None].view(np.uint8) for x in (self.d, self.m))
        return np.concatenate([d, m, np.asarray(self.qs)], axis=-1).reshape(self.shape[1], -1)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        q = jnp.concatenate([self.qs & 0xF, self.qs >> 4], axis=-1).astype(jnp.float32)
        w = self.d.astype(jnp.float32)[..., None] * q + self.m.astype(jnp.float32)[..., None]
        return w.reshape(self.shape[1], self.shape[0]).T.astype(dtype or self.dtype)

    def rows(self, ids: jax.Array, dtype: Any = None) -> jax.Array:
        qs = self.qs[ids]
        q = jnp.concatenate([qs & 0xF, qs >> 4], axis=-1).astype(jnp.float32)
        w = self.d[ids].astype(jnp.float32)[..., None] * q + self.m[ids].astype(jnp.float32)[..., None]
        return w.reshape(*ids.shape, self.shape[0]).astype(dtype or self.dtype)


GGUF_TYPES = {"Q8_0": Q8_0, "Q4_1": Q4_1}


def from_gguf_blocks(
    qtype_name: str, raw: np.ndarray, torch_shape: Sequence[int], dtype: Any = np.float32
) -> Quantized:
    """A GGUF tensor's blocks, unchanged, as a quantized Flax kernel: `dequantize()` is the torch weight
    (d_out, d_in) = `torch_shape` transposed to (d_in, d_out), in `dtype` unless asked otherwise.

    raw: the tensor's bytes as the file stores them (gguf.GGUFReader's `tensor.data`, uint8, any shape).
    """
    kind = GGUF_TYPES.get(str(qtype_name).upper())
    if kind is None:
        raise QuantError(
            f"GGUF type {qtype_name!r} has no quantized kernel here (have {sorted(GGUF_TYPES)}); dequantize it with "
            "gguf.quants.dequantize and load it as a float kernel."
        )
    if len(torch_shape) != 2:
        raise QuantError(f"GGUF kernels are 2-D torch weights (d_out, d_in); got shape {tuple(torch_shape)}.")
    d_out, d_in = (int(s) for s in torch_shape)
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    expected = d_out * (d_in // GGUF_BLOCK) * kind.BYTES
    if d_in % GGUF_BLOCK or raw.size != expected:
        raise QuantError(
            f"{qtype_name} bytes ({raw.size}) do not hold a torch weight of shape {(d_out, d_in)} (that needs d_in "
            f"a multiple of 32 and {expected} bytes): wrong shape or type for this tensor."
        )
    return kind.from_blocks(raw, d_out, dtype)


def llama_qk_order(d_out: int, n_heads: int) -> np.ndarray:
    """The output-row order that undoes llama.cpp's Q/K permutation (convert_hf_to_gguf's `permute`, whose inverse
    transformers' GGUF loader applies): `hf_weight = gguf_weight[order]`. Pass the KV head count for K."""
    return np.arange(d_out).reshape(n_heads, d_out // n_heads // 2, 2).swapaxes(1, 2).reshape(-1)


def reorder_outputs(kernel: Any, order: np.ndarray) -> Any:
    """The kernel with output features taken in `order` (kernel[:, order]); a block-quantized kernel moves its
    whole block rows, so nothing is dequantized or requantized."""
    order = np.asarray(order)
    if isinstance(kernel, (Q8_0, Q4_1)):
        return kernel.replace(**{f: getattr(kernel, f)[order] for f in ("d", "m", "qs") if hasattr(kernel, f)})
    if isinstance(kernel, Int8):
        return kernel.replace(values=kernel.values[:, order], scale=kernel.scale[order])
    if isinstance(kernel, NF4):
        raise QuantError("NF4 blocks may span output rows; reorder the float kernel before quantizing it.")
    return kernel[:, order]


# ---------------------------------------------------------------------------------------------------------------
# The matmul, and whole-tree transforms
# ---------------------------------------------------------------------------------------------------------------


def matmul(x: jax.Array, kernel: Quantized, precision: Any = None) -> jax.Array:
    """x @ kernel, dequantized to x's dtype here; the backward pass dequantizes again rather than keep the float
    kernel from the forward pass (as bitsandbytes' 4-bit matmul does)."""
    return _dequantized_dot(x, kernel, precision)


@partial(jax.checkpoint, static_argnums=(2,))
def _dequantized_dot(x: jax.Array, kernel: Quantized, precision: Any) -> jax.Array:
    # leading axes flattened into one token axis, as layers.token_dot (which imports this module) does
    out = jnp.dot(x.reshape(-1, x.shape[-1]), kernel.dequantize(x.dtype), precision=precision)
    return out.reshape(*x.shape[:-1], kernel.shape[-1])


def quantize(kernel: Any, method: str, **kw: Any) -> Quantized:
    """One float kernel (d_in, d_out) as a quantized kernel; kw go to the method (nf4: block_size, double_quant)."""
    if method == "nf4":
        return NF4.quantize(kernel, **kw)
    if method == "int8":
        return Int8.quantize(kernel, **kw)
    if method in ("q8_0", "q4_1"):
        # ggml's own quantizer (the gguf package), so the blocks equal what llama.cpp writes.
        import gguf

        qtype = getattr(gguf.GGMLQuantizationType, method.upper())
        torch_weight = np.asarray(kernel, np.float32).T
        return from_gguf_blocks(method.upper(), gguf.quants.quantize(torch_weight, qtype), torch_weight.shape,
                                np.asarray(kernel).dtype)  # fmt: skip
    raise QuantError(f"Unknown quantization method {method!r}; choose one of {list(METHODS)}.")


@struct.dataclass
class Table(Quantized):
    """A frozen embedding table (vocab, d) held as the quantized kernel (d, vocab) of the LM head tied to it, so its
    blocks run along token rows: a lookup dequantizes only the rows it reads, and the tied head is `matmul`."""

    kernel: Quantized
    shape: tuple[int, int] = struct.field(pytree_node=False)
    dtype: Any = struct.field(pytree_node=False)

    @classmethod
    def quantize(cls, table: Any, method: str, **kw: Any) -> Table:
        table = np.asarray(table)
        return cls(quantize(table.T, method, **kw), tuple(table.shape), np.dtype(table.dtype))

    def dequantize(self, dtype: Any = None) -> jax.Array:
        return self.kernel.dequantize(dtype).T

    def rows(self, ids: jax.Array, dtype: Any = None) -> jax.Array:
        return self.kernel.rows(ids, dtype)

    def attend(self, query: jax.Array) -> jax.Array:
        """query @ table.T: the tied LM head's logits."""
        return matmul(query, self.kernel)


def quantize_params(
    params: Params,
    method: str,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    embeddings: Sequence[str] = (),
    **kw: Any,
) -> dict[str, Any]:
    """Every frozen 2-D `kernel` quantized with `method`; LoRA leaves, biases, norms and embeddings stay as they
    are, and so do kernels whose path contains an `exclude` pattern as whole components (the heads by default,
    e.g. `classifier.out_proj.kernel`: pass exclude=() to quantize them too). Already-quantized kernels stay.
    `embeddings`: module paths (e.g. "model.embed_tokens") whose `embedding` table is quantized too, as a `Table`;
    QLoRA leaves the embedding in float, but a tied table is most of a small model's frozen bytes."""
    if method not in METHODS:
        raise QuantError(f"Unknown quantization method {method!r}; choose one of {list(METHODS)}.")
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    embeddings = (embeddings,) if isinstance(embeddings, str) else tuple(embeddings)

    def convert(path: str, leaf: Any) -> Any:
        module, _, name = path.rpartition(".")
        if name == "embedding" and module in embeddings and not is_quantized(leaf):
            return Table.quantize(leaf, method, **kw)
        if name != "kernel" or is_quantized(leaf):
            return leaf
        if np.ndim(leaf) != 2 or any(matches_leaf(p, path) for p in exclude):
            return leaf
        return quantize(leaf, method, **kw)

    return map_with_path(convert, params)


def dequantize_params(params: Params, dtype: Any = None) -> dict[str, Any]:
    """Every quantized kernel replaced by its float kernel (in its own dtype unless `dtype` is given)."""
    return map_with_path(lambda _, leaf: leaf.dequantize(dtype) if is_quantized(leaf) else leaf, params)


def base_bytes(params: Params) -> int:
    """Bytes the params hold, quantized kernels counted by what they store."""
    return sum(
        leaf.nbytes if is_quantized(leaf) else int(np.size(leaf)) * np.dtype(leaf.dtype).itemsize
        for leaf in jax.tree.leaves(params, is_leaf=is_quantized)
    )
