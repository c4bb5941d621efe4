"""The paper's Section 7 analyses of trained adapters: subspace similarity between A matrices (Figures 3, 4)
and how delta W relates to W (Table 7). `experiments/analyze.py` runs them on saved run folders.

Numerical code is plain numpy; plotting lives in `lora_jax.analysis.plots` (needs matplotlib) and is not
imported here.
"""

from lora_jax.analysis.amplification import (
    Amplification,
    amplification,
    low_rank_singular_vectors,
    projection_norm,
    random_orthonormal,
    top_singular_vectors,
)
from lora_jax.analysis.subspace import (
    LoraFactors,
    adapter_similarity,
    by_kind,
    expected_random_similarity,
    grassmann_similarity,
    input_directions,
    lora_factors,
    mean_over_layers,
    random_gaussian_control,
    similarity_from_directions,
    split_layer,
)

__all__ = [
    "Amplification",
    "LoraFactors",
    "adapter_similarity",
    "amplification",
    "by_kind",
    "expected_random_similarity",
    "grassmann_similarity",
    "input_directions",
    "lora_factors",
    "low_rank_singular_vectors",
    "mean_over_layers",
    "projection_norm",
    "random_gaussian_control",
    "random_orthonormal",
    "similarity_from_directions",
    "split_layer",
    "top_singular_vectors",
]
