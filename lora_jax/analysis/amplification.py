"""Does delta W amplify directions W already has? The paper's Table 7 (Sec. 7.3, appendix H.4).

Project the frozen W onto an r-dimensional pair of subspaces and measure what is left: ||U^T W V||_F, with U, V
the top-r left/right singular vectors of (1) delta W, (2) W itself, (3) a random matrix. The paper finds
(1) far below (2) but well above (3): delta W mostly boosts directions that W has but does not emphasise, by the
amplification factor ||delta W||_F / ||U^T W V||_F (U, V from delta W).

Orientation. lora_jax keeps a kernel as W (d_in x d_out) with y = x W and delta W = scale * A B (A: d_in x r,
B: r x d_out). Here U (d_in x r) and V (d_out x r) are the left and right singular vectors of matrices in THAT
orientation. The paper's W is our W^T, so its U is our V and its V our U; ||U^T W V||_F is the same number either
way (a transpose does not change a Frobenius norm), as long as W and delta W share an orientation, which they do.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


def top_singular_vectors(matrix: Any, r: int) -> tuple[np.ndarray, np.ndarray]:
    """(U_r, V_r): the top-r left (rows' space) and right (columns' space) singular vectors of `matrix`."""
    m = np.asarray(matrix, np.float64)
    if not 1 <= r <= min(m.shape):
        raise ValueError(f"r must be in 1..{min(m.shape)} for a {m.shape} matrix, got {r}.")
    u, _, vt = np.linalg.svd(m, full_matrices=False)
    return u[:, :r], vt[:r].T


def low_rank_singular_vectors(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    """Left/right singular vectors of A B (A: d_in x r, B: r x d_out) without forming the d_in x d_out product.

    A = Qa Ra and B^T = Qb Rb give A B = Qa (Ra Rb^T) Qb^T, so the SVD of the small r x r core suffices.
    """
    qa, ra = np.linalg.qr(np.asarray(a, np.float64))
    qb, rb = np.linalg.qr(np.asarray(b, np.float64).T)
    u, _, vt = np.linalg.svd(ra @ rb.T)
    return qa @ u, qb @ vt.T


def random_orthonormal(d: int, r: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random r-frame in R^d: the singular vectors of a Gaussian matrix have this distribution."""
    q, rr = np.linalg.qr(rng.standard_normal((d, r)))
    return q * np.sign(np.diag(rr))  # fix QR's sign convention so the frame is exactly Haar-distributed


def projection_norm(w: Any, u: np.ndarray, v: np.ndarray) -> float:
    """||U^T W V||_F: how much of W lives in the subspace pair (U, V)."""
    return float(np.linalg.norm(u.T @ np.asarray(w, np.float64) @ v))


@dataclasses.dataclass(frozen=True)
class Amplification:
    """One Table 7 column: a weight W, its update delta W of rank <= r, and the three projections."""

    r: int
    w_norm: float  # ||W||_F
    delta_norm: float  # ||delta W||_F
    proj_delta: float  # ||U^T W V||_F, U, V from delta W
    proj_w: float  # ... from W itself
    proj_random: float  # ... from a random matrix

    @property
    def factor(self) -> float:
        """||delta W||_F / ||U^T W V||_F (delta W's directions): the paper's amplification factor."""
        return self.delta_norm / self.proj_delta if self.proj_delta > 0 else float("inf")

    def to_dict(self) -> dict[str, float]:
        return {**dataclasses.asdict(self), "amplification": self.factor}


def amplification(
    w: Any, a: Any, b: Any, scale: float = 1.0, rng: np.random.Generator | int | None = None
) -> Amplification:
    """Table 7 for W (d_in x d_out) and delta W = scale * a @ b (a: d_in x r, b: r x d_out), r = a's columns.

    The random subspaces are one draw from `rng` (an int seeds it).
    """
    w = np.asarray(w, np.float64)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape[0] != w.shape[0] or b.shape[1] != w.shape[1] or a.shape[1] != b.shape[0]:
        raise ValueError(f"Shapes do not fit delta W = A B on W: W {w.shape}, A {a.shape}, B {b.shape}; "
                         "pass W as the d_in x d_out kernel (lora_jax orientation).")  # fmt: skip
    r = a.shape[1]
    rng = np.random.default_rng(rng)
    u_delta, v_delta = low_rank_singular_vectors(a, b)
    u_w, v_w = top_singular_vectors(w, r)
    u_rand, v_rand = random_orthonormal(w.shape[0], r, rng), random_orthonormal(w.shape[1], r, rng)
    delta_norm = abs(scale) * float(np.linalg.norm(a @ b))
    return Amplification(
        r=r,
        w_norm=float(np.linalg.norm(w)),
        delta_norm=delta_norm,
        proj_delta=projection_norm(w, u_delta, v_delta),
        proj_w=projection_norm(w, u_w, v_w),
        proj_random=projection_norm(w, u_rand, v_rand),
    )
