"""Residual vector quantization of preference vectors into discrete codes (tokens).

Level ``l`` quantizes the residual left by levels ``< l``; a vector's codes ``[c_0..c_{L-1}]``
decode to ``sum_l codebook[l, c_l]``. Codebooks are buffers, not parameters: they are seeded by
FAISS k-means and then follow their assigned vectors by exponential moving averages (EMA), as in
VQ-VAE-2 / SoundStream; the encoder is trained through the straight-through estimator and a
commitment loss ``beta * |x - sg(sum_l q_l)|^2`` on the final reconstruction. Codes whose EMA
usage falls below a threshold are restarted on vectors of the current batch (chosen in
proportion to their quantization error), so that codes stay in use.
All state (codebooks, EMA statistics, the initialised flag) is in ``state_dict``.
Under data-parallel training (``recbole_dppmg.distributed``) the EMA statistics are summed over
the ranks and k-means and dead-code restarts are taken from rank 0, so all ranks keep the same
codebooks; in one process those calls do nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import faiss
import numpy as np
import torch
from torch import nn

from recbole_dppmg.distributed import sync_from_rank0_, sync_sum_


class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor  # [N, dim]; value of the reconstruction, gradient of the input
    codes: torch.Tensor  # long [N, levels]
    commitment_loss: torch.Tensor  # scalar, already multiplied by commitment_beta


def faiss_kmeans(x: torch.Tensor, k: int, iters: int = 25, seed: int = 0, redo: int = 3) -> torch.Tensor:
    """``k`` centroids of the rows of ``x`` by FAISS k-means (float32, on ``x``'s device); the
    best of ``redo`` runs, since one run from random centroids can stall in a poor optimum.

    With fewer rows than ``k`` the rows are repeated with a little noise first, so that every
    centroid still lies at (or next to) a data point.
    """
    data = x.detach().float().cpu()
    if data.shape[0] < k:
        gen = torch.Generator().manual_seed(seed)
        extra = data[torch.randint(0, data.shape[0], (k - data.shape[0],), generator=gen)]
        scale = 1e-3 * (data.std() if data.shape[0] > 1 else 1.0)
        data = torch.cat([data, extra + scale * torch.randn(extra.shape, generator=gen)])
    kmeans = faiss.Kmeans(
        data.shape[1],
        k,
        niter=iters,
        nredo=redo,
        seed=seed,
        verbose=False,
        min_points_per_centroid=1,
        max_points_per_centroid=256,
    )
    kmeans.train(np.ascontiguousarray(data.numpy(), dtype=np.float32))
    return torch.from_numpy(kmeans.centroids.copy()).to(x.device)


def nearest_code(residual: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row (squared L2) for every row of ``residual``."""
    dist = residual.pow(2).sum(1, keepdim=True) - 2 * residual @ codebook.t() + codebook.pow(2).sum(1).unsqueeze(0)
    return dist.argmin(1)


class ResidualVectorQuantizer(nn.Module):
    """``levels`` codebooks of ``codebook_size`` vectors of size ``dim``, residual-stacked.
    ``commitment_beta``, ``ema_decay`` and ``dead_code_threshold`` have no defaults here: DPPMG
    passes its keys (properties/model/DPPMG.yaml, the one place their values live)."""

    def __init__(
        self,
        levels: int,
        codebook_size: int,
        dim: int,
        *,
        commitment_beta: float,
        ema_decay: float,
        dead_code_threshold: float,
        kmeans_iters: int = 25,
        eps: float = 1e-5,
    ):
        super().__init__()
        if levels < 1 or codebook_size < 1 or dim < 1:
            raise ValueError(f"levels, codebook_size, dim must be >= 1, got {levels}, {codebook_size}, {dim}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.levels, self.codebook_size, self.dim = levels, codebook_size, dim
        self.commitment_beta = commitment_beta
        self.ema_decay = ema_decay
        self.dead_code_threshold = dead_code_threshold
        self.kmeans_iters = kmeans_iters
        self.eps = eps
        self.register_buffer("codebooks", torch.zeros(levels, codebook_size, dim))
        self.register_buffer("ema_count", torch.zeros(levels, codebook_size))
        self.register_buffer("ema_sum", torch.zeros(levels, codebook_size, dim))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("restarts", torch.zeros(levels, dtype=torch.long))  # total, per level

    @property
    def is_initialized(self) -> bool:
        return bool(self.initialized)

    @torch.no_grad()
    def kmeans_init(self, x: torch.Tensor, seed: int | None = None) -> None:
        """Set every level's codebook to k-means centroids of that level's residuals of ``x``.

        EMA statistics restart from the resulting cluster sizes. ``seed`` defaults to a draw
        from torch's global generator, so RecBole's ``seed`` makes the run reproducible.
        """
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,)))
        residual = x.detach().float()
        for level in range(self.levels):
            centroids = faiss_kmeans(residual, self.codebook_size, self.kmeans_iters, seed + level)
            codes = nearest_code(residual, centroids)
            counts = torch.bincount(codes, minlength=self.codebook_size).float()
            self.codebooks[level] = centroids
            self.ema_count[level] = counts
            self.ema_sum[level] = centroids * counts.unsqueeze(1)
            residual = residual - centroids[codes]
        sync_from_rank0_(self.codebooks, self.ema_count, self.ema_sum)  # DDP: one k-means for all ranks
        self.initialized.fill_(True)

    def _require_init(self) -> None:
        if not self.is_initialized:
            raise RuntimeError("ResidualVectorQuantizer used before kmeans_init() or load_state_dict()")

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes ``[N, levels]`` of vectors ``x [N, dim]`` (greedy residual nearest codes)."""
        self._require_init()
        residual = x.detach().float()
        codes = []
        for level in range(self.levels):
            c = nearest_code(residual, self.codebooks[level])
            residual = residual - self.codebooks[level][c]
            codes.append(c)
        return torch.stack(codes, 1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Vectors ``[N, dim]`` for codes ``[N, levels']`` (``levels' <= levels``: a prefix)."""
        self._require_init()
        out = torch.zeros(codes.shape[0], self.dim, device=self.codebooks.device)
        for level in range(codes.shape[1]):
            out += self.codebooks[level][codes[:, level]]
        return out

    def forward(self, x: torch.Tensor) -> QuantizerOutput:
        """Quantize ``x``; in training mode also update the codebooks (EMA, dead-code restart).

        Pass each vector once per step (e.g. unique users of a batch): EMA counts are usages
        per step, and ``dead_code_threshold`` is compared with them.
        """
        self._require_init()
        residual = x.detach()
        quantized = torch.zeros_like(residual)
        codes = []
        for level in range(self.levels):
            codebook = self.codebooks[level]
            c = nearest_code(residual, codebook)
            q = codebook[c]
            if self.training:
                self._ema_update(level, residual, c, q)
            quantized = quantized + q
            residual = residual - q
            codes.append(c)
        # Commitment to the final reconstruction only: a per-level sum would also pull every
        # vector towards its level-0 code alone, collapsing users onto their coarse clusters.
        commitment = (x - quantized).pow(2).sum(1).mean()
        quantized = x + (quantized - x).detach()  # straight-through estimator
        return QuantizerOutput(quantized, torch.stack(codes, 1), self.commitment_beta * commitment)

    @torch.no_grad()
    def _ema_update(self, level: int, residual: torch.Tensor, codes: torch.Tensor, q: torch.Tensor) -> None:
        decay, k = self.ema_decay, self.codebook_size
        counts = torch.bincount(codes, minlength=k).to(residual.dtype)
        sums = torch.zeros_like(self.ema_sum[level]).index_add_(0, codes, residual)
        sync_sum_(counts, sums)  # DDP: every rank's batch, so all ranks apply the same update
        self.ema_count[level].mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_sum[level].mul_(decay).add_(sums, alpha=1 - decay)
        total = self.ema_count[level].sum()
        smoothed = (self.ema_count[level] + self.eps) / (total + k * self.eps) * total  # Laplace
        self.codebooks[level] = self.ema_sum[level] / smoothed.unsqueeze(1)
        if self.dead_code_threshold > 0:
            self._restart_dead(level, residual, q)

    @torch.no_grad()
    def _restart_dead(self, level: int, residual: torch.Tensor, q: torch.Tensor) -> None:
        dead = (self.ema_count[level] < self.dead_code_threshold).nonzero().squeeze(1)
        if dead.numel() == 0:
            return
        # Badly quantized vectors of this batch are the most useful new codes.
        error = (residual - q).pow(2).sum(1) + 1e-12
        pick = torch.multinomial(error, dead.numel(), replacement=dead.numel() > residual.shape[0])
        reset = max(float(self.ema_count[level].mean()), 2.0 * self.dead_code_threshold)
        self.codebooks[level, dead] = residual[pick]
        self.ema_count[level, dead] = reset
        self.ema_sum[level, dead] = residual[pick] * reset
        self.restarts[level] += dead.numel()
        # DDP: every rank found the same dead codes (identical EMA counts); rank 0's picks win.
        sync_from_rank0_(self.codebooks[level], self.ema_count[level], self.ema_sum[level])

    @torch.no_grad()
    def code_stats(self, x: torch.Tensor) -> dict[str, list[float]]:
        """Per level, over the vectors ``x``: codes used, perplexity of the code distribution,
        and the fraction of variance left after that level,
        ``sum |x - decode(codes[:, :l+1])|^2 / sum |x - mean(x)|^2`` (relative to the spread of
        the vectors, not their norm: preference vectors share a large common component)."""
        codes = self.encode(x)
        x = x.detach().float()
        norm = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
        used, perplexity, error = [], [], []
        recon = torch.zeros_like(x)
        for level in range(self.levels):
            counts = torch.bincount(codes[:, level], minlength=self.codebook_size).float()
            p = counts / counts.sum()
            entropy = -(p[p > 0] * p[p > 0].log()).sum()
            recon += self.codebooks[level][codes[:, level]]
            used.append(int((counts > 0).sum()))
            perplexity.append(float(entropy.exp()))
            error.append(float((x - recon).pow(2).sum() / norm))
        return {"codes_used": used, "perplexity": perplexity, "quant_error": error}
