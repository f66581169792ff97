"""What a masked pixel becomes: the masking value ("fill"), in normalised units.

* ``mean``: the dataset-mean colour (a constant; the paper's choice). The mask's shape stays visible.
* ``noise``: Gaussian noise of the dataset's pixel statistics (N(0, 1) per channel after normalisation).
* ``impute``: ROAD's noisy linear imputation (Rong et al., ICML 2022): each masked pixel is the weighted mean
  of its 8 neighbours (1/6 direct, 1/12 diagonal), solved jointly for all masked pixels from the kept ones,
  plus Gaussian noise (sigma ``impute_noise``) on the imputed pixels.

Neither ``noise`` nor ``impute`` carries anything from the masked pixels themselves, and both hide where the
kept pixels are far better than a flat colour does. (A blur of the original would leak the masked content.)
The imputation is solved batched with preconditioned conjugate gradients on the image grid.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

FILLS = ("mean", "noise", "impute")

def _neighbour_sum(v: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each pixel's in-image neighbours, per (N, 1, H, W) map (shifted adds: several times
    faster than a one-channel convolution on the CPU)."""
    h, w = v.shape[-2:]
    padded = F.pad(v, (1, 1, 1, 1))
    direct = padded[..., :h, 1:-1] + padded[..., 2:, 1:-1] + padded[..., 1:-1, :w] + padded[..., 1:-1, 2:]
    diagonal = padded[..., :h, :w] + padded[..., :h, 2:] + padded[..., 2:, :w] + padded[..., 2:, 2:]
    return direct / 6 + diagonal / 12


@torch.no_grad()
def impute(x: torch.Tensor, keep: torch.Tensor, tolerance: float = 1e-4, max_iterations: int = 500,
           start: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` (N, C, H, W) with every pixel where ``keep`` (N, 1, H, W, True = kept) is False replaced by the
    solution of ROAD's linear system: w(p) * v(p) = sum_q w(p, q) v(q) over p's neighbours q, kept pixels
    fixed (to a relative residual of ``tolerance``). An image with no kept pixel gets 0 (the mean colour).
    ``start``: a guess (N, C, H, W), e.g. the solution for a slightly smaller mask, that saves iterations."""
    n, c, h, w = x.shape
    known = keep.to(x.dtype).expand(n, c, h, w).reshape(n * c, 1, h, w)
    unknown = 1 - known
    values = x.reshape(n * c, 1, h, w) * known
    degree = _neighbour_sum(torch.ones_like(values[:1]))  # the weights of the neighbours inside the image

    def apply(v):  # the system's matrix on the unknown pixels (symmetric positive definite)
        return (degree * v - _neighbour_sum(v * unknown)) * unknown

    b = _neighbour_sum(values) * unknown
    solution = torch.zeros_like(values) if start is None else start.reshape(n * c, 1, h, w) * unknown
    residual = b - apply(solution)
    z = residual / degree
    direction = z.clone()
    rz = (residual * z).sum((1, 2, 3), keepdim=True)
    scale = b.square().sum((1, 2, 3), keepdim=True).sqrt().clamp_min(1e-12)
    for _ in range(max_iterations):
        if (residual.square().sum((1, 2, 3), keepdim=True).sqrt() / scale).max() <= tolerance:
            break
        ad = apply(direction)
        alpha = rz / (direction * ad).sum((1, 2, 3), keepdim=True).clamp_min(1e-30)
        solution += alpha * direction
        residual -= alpha * ad
        z = residual / degree
        rz_next = (residual * z).sum((1, 2, 3), keepdim=True)
        direction = z + rz_next / rz.clamp_min(1e-30) * direction
        rz = rz_next
    return (values + solution * unknown).reshape(n, c, h, w)


def noise_images(index, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """(len(index), *shape) N(0, 1) noise, one fixed image per dataset row (whatever batch it is drawn in)."""
    return torch.from_numpy(np.stack([np.random.default_rng([seed, int(i)]).standard_normal(shape, dtype=np.float32)
                                      for i in np.asarray(index).reshape(-1)]))


class Fill:
    """A masking value: ``fill(x, keep)`` replaces the masked pixels of normalised images ``x``.

    ``noise`` draws fresh noise from a generator seeded with ``seed`` (reproducible for the same sequence of
    calls). :meth:`for_rows` gives the fixed per-image baselines backward selection uses instead.
    """

    def __init__(self, kind: str = "mean", baseline: float = 0.0, seed: int = 0, impute_noise: float = 0.01):
        if kind not in FILLS:
            raise ValueError(f"unknown fill {kind!r}; choose one of {', '.join(FILLS)}")
        self.kind, self.baseline, self.seed, self.impute_noise = kind, float(baseline), int(seed), float(impute_noise)
        self._generator = None

    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        if self._generator is None or self._generator.device != like.device:
            self._generator = torch.Generator(device=like.device).manual_seed(self.seed)
        return torch.randn(like.shape, generator=self._generator, device=like.device, dtype=like.dtype)

    def __call__(self, x: torch.Tensor, keep: torch.Tensor, imputed: torch.Tensor | None = None) -> torch.Tensor:
        """``imputed``: :func:`impute` of these images and masks when already solved (a training set's masks
        do not change between epochs, so its imputation is solved once, not every batch)."""
        kept = keep.bool()
        if self.kind == "mean":
            return torch.where(kept, x, torch.full_like(x, self.baseline))
        if self.kind == "noise":
            return torch.where(kept, x, self._noise(x))
        solved = impute(x, kept) if imputed is None else imputed
        return torch.where(kept, x, solved + self.impute_noise * self._noise(x))

    def for_rows(self, index, shape: tuple[int, ...]):
        """The ``baselines`` backward selection of the images at dataset rows ``index`` masks with: the
        constant for ``mean``; one fixed noise image per dataset row for ``noise`` (so a result does not
        depend on the sharding); for ``impute`` a callable ``(x, keep, rows) -> baseline images`` of a batch at
        positions ``rows``, the imputation from the pixels still present plus that noise."""
        if self.kind == "mean":
            return self.baseline
        noise = noise_images(index, shape, self.seed)
        if self.kind == "noise":
            return noise
        previous = {}  # backward selection grows a batch's masks a little per step: its last solution is a
        # good start for the next

        def baselines(x, keep, rows):
            key = (int(rows[0]), len(rows))
            start = previous.get(key)
            previous.clear()
            previous[key] = impute(x, keep.bool(), tolerance=1e-3, start=start)
            return previous[key] + self.impute_noise * noise[rows.cpu()].to(x)

        return baselines

    def describe(self) -> dict:
        """The settings a result made with this fill records (none for the paper's mean colour)."""
        if self.kind == "mean":
            return {}
        settings = {"fill": self.kind, "fill_seed": self.seed}
        return settings | ({"impute_noise": self.impute_noise} if self.kind == "impute" else {})
