"""Vector quantisation (VQ-VAE, van den Oord et al. 2017): the one codebook lookup of visgen.

Every discrete tokenizer (LlamaGen's VQ-16/VQ-8, MaskGIT's taming VQGAN, visgen-trained VQs) runs
through `VectorQuantizer`:

* nearest code: k = argmin_j ||z − e_j||², in float32 whatever the autocast (a bf16 distance picks
  the wrong code often enough to matter), chunked over positions so a 16,384-code search at 256 px
  never builds more than `chunk_size` × K distances at once;
* `l2_normalized=True` normalises both z and the codes before the search and the lookup
  (LlamaGen's VQ: codebook 16,384 × 8, "codebook_l2_norm"), so the decoder reads unit vectors;
  `False` is plain Euclidean search (taming's VQGAN, MaskGIT: 1,024 × 256);
* straight-through estimator: the decoder gets sg(e_k) + z − sg(z) (= e_k exactly in the forward
  pass), so gradients pass to the encoder as if quantisation were the identity;
* losses (VQ-VAE eq. 3): codebook ||sg(z) − e_k||², commitment β·||z − sg(e_k)||² (β = 0.25, as LlamaGen;
  taming's VectorQuantizer2 defaults to legacy=True, β on the codebook term: the same loss value, but 4x the
  encoder's and 1/4 the codebook's gradient),
  and optionally LlamaGen's entropy loss on the softmax of −distances / T (per-position entropy
  minus the entropy of the batch-average assignment: confident codes, all codes used);
* `lookup(codes)` maps integer codes back to exactly the vectors the decoder saw in training.

The codebook is `embedding.weight`, the name taming, diffusers' VQModel and LlamaGen all store it
under, so released codebooks load without renaming. Usage statistics are not a buffer here (they
would be one more key for strict loading to reconcile): `code_usage` counts codes from `codes`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["VectorQuantizer", "Quantized", "code_usage", "entropy_loss", "nearest_codes"]


@dataclass
class Quantized:
    """What `VectorQuantizer.forward` returns: decoder input, codes and the (already weighted) losses."""

    vectors: Tensor  # (B, D, h, w) straight-through quantised vectors
    codes: Tensor  # (B, h, w) int64
    codebook_loss: Tensor  # scalar: mean ||sg(z) − e_k||²
    commitment_loss: Tensor  # scalar: β · mean ||z − sg(e_k)||²
    entropy_loss: Tensor  # scalar: entropy_weight · (sample entropy − batch entropy); 0 when off
    latents: Tensor  # (N, D) detached encoder vectors the search saw (l2-normalised if the lookup is): for restarts

    @property
    def loss(self) -> Tensor:
        """The VQ terms of the generator loss: codebook + commitment + entropy."""
        return self.codebook_loss + self.commitment_loss + self.entropy_loss


def _no_autocast(device_type: str) -> torch.autocast:
    """An autocast-off region: distances, lookup and VQ losses stay in float32."""
    return torch.autocast(device_type, enabled=False)


@torch.no_grad()
def nearest_codes(z: Tensor, codebook: Tensor, chunk_size: int = 16384) -> Tensor:
    """Index of the nearest codebook row for each row of z: argmin_j ||z_i − e_j||², float32.

    z (N, D), codebook (K, D) -> (N,) int64. Written as ||z||² + ||e||² − 2 z·e, as taming and
    LlamaGen compute it, `chunk_size` rows of z at a time.
    """
    z, codebook = z.float(), codebook.float()
    code_sq = codebook.pow(2).sum(dim=1)  # (K,)
    out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    for start in range(0, z.shape[0], chunk_size):
        rows = z[start: start + chunk_size]  # (n, D)
        dist = rows.pow(2).sum(dim=1, keepdim=True) + code_sq - 2.0 * rows @ codebook.t()  # (n, K)
        out[start: start + chunk_size] = dist.argmin(dim=1)
    return out


def entropy_loss(logits: Tensor, temperature: float = 0.01) -> Tensor:
    """LlamaGen's / MaskGIT's codebook entropy loss on affinities (N, K) (e.g. −distances).

    mean_i H(p_i) − H(mean_i p_i) with p_i = softmax(logits_i / T): low when each position is sure
    of its code and the batch spreads over many codes.
    """
    logits = logits.reshape(-1, logits.shape[-1]).float() / temperature  # (N, K)
    probs = logits.softmax(dim=-1)  # (N, K)
    log_probs = F.log_softmax(logits + 1e-5, dim=-1)  # (N, K); LlamaGen adds 1e-5 here, a no-op under softmax
    avg_probs = probs.mean(dim=0)  # (K,)
    avg_entropy = -(avg_probs * torch.log(avg_probs + 1e-5)).sum()
    sample_entropy = -(probs * log_probs).sum(dim=-1).mean()
    return sample_entropy - avg_entropy


def code_usage(codes: Tensor, num_codes: int) -> Tensor:
    """How often each code occurs in `codes` (any shape): (num_codes,) int64 counts."""
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= num_codes):
        raise ValueError(f"codes range over [{int(codes.min())}, {int(codes.max())}], outside the codebook "
                         f"[0, {num_codes - 1}]")
    return torch.bincount(codes.reshape(-1), minlength=num_codes)


class VectorQuantizer(nn.Module):
    """Nearest-code quantiser with a straight-through estimator, VQ losses and exact code lookup."""

    def __init__(
        self,
        num_codes: int,
        code_dim: int,
        l2_normalized: bool = False,
        beta: float = 0.25,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 0.01,
        chunk_size: int = 16384,
    ):
        """`num_codes` × `code_dim` codebook; `l2_normalized` for LlamaGen's cosine lookup; β weights the
        commitment term (VQ-VAE, taming, LlamaGen: 0.25); `entropy_weight` > 0 adds LlamaGen's entropy loss."""
        super().__init__()
        if num_codes < 1 or code_dim < 1:
            raise ValueError(f"VectorQuantizer needs num_codes >= 1 and code_dim >= 1, got {num_codes} x {code_dim}")
        self.num_codes = num_codes
        self.code_dim = code_dim
        self.l2_normalized = l2_normalized
        self.beta = beta
        self.entropy_weight = entropy_weight
        self.entropy_temperature = entropy_temperature
        self.chunk_size = chunk_size
        self.embedding = nn.Embedding(num_codes, code_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """taming's and LlamaGen's init: U(−1/K, 1/K), rows normalised when the lookup is l2-normalised."""
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / self.num_codes, 1.0 / self.num_codes)
            if self.l2_normalized:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, code_dim={self.code_dim}, l2_normalized={self.l2_normalized}, "
                f"beta={self.beta}, entropy_weight={self.entropy_weight}")

    def codebook(self) -> Tensor:
        """The (K, D) float32 vectors codes stand for (unit rows when l2-normalised)."""
        weight = self.embedding.weight.float()
        return F.normalize(weight, dim=-1) if self.l2_normalized else weight

    def flatten(self, z: Tensor) -> Tensor:
        """(B, D, h, w) -> the float32 (N, D) vectors the search compares (unit rows when l2-normalised)."""
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (N, D)
        return F.normalize(flat, dim=-1) if self.l2_normalized else flat

    def forward(self, z: Tensor) -> Quantized:
        """z (B, D, h, w) from the encoder -> `Quantized` (straight-through vectors, codes, losses), float32."""
        batch, dim, height, width = z.shape
        if dim != self.code_dim:
            raise ValueError(f"VectorQuantizer got {dim} channels, its codes have {self.code_dim}; check quant_conv")
        with _no_autocast(z.device.type):
            flat = self.flatten(z)  # (N, D), N = B·h·w
            codebook = self.codebook()  # (K, D)
            codes = nearest_codes(flat, codebook, self.chunk_size)  # (N,)
            chosen = codebook[codes]  # (N, D)
            codebook_loss = F.mse_loss(chosen, flat.detach())
            commitment_loss = self.beta * F.mse_loss(flat, chosen.detach())
            if self.entropy_weight > 0:
                dist = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2.0 * flat @ codebook.t()  # (N, K)
                entropy = self.entropy_weight * entropy_loss(-dist, self.entropy_temperature)
            else:
                entropy = flat.new_zeros(())
            # Forward: exactly e_k (x − x is exactly 0, whereas z + (e_k − z) is e_k up to rounding), so the
            # decoder sees in training bit for bit what `lookup(codes)` gives it; backward: identity to z.
            straight = chosen.detach() + (flat - flat.detach())  # (N, D)
        vectors = straight.reshape(batch, height, width, dim).permute(0, 3, 1, 2).contiguous()  # (B, D, h, w)
        return Quantized(vectors, codes.reshape(batch, height, width), codebook_loss, commitment_loss, entropy,
                         flat.detach())

    @torch.no_grad()
    def restart_codes(self, dead: Tensor, latents: Tensor, generator: torch.Generator | None = None) -> int:
        """Move the codes flagged in `dead` (K,) bool onto random rows of `latents` (N, D): codebook restarts
        (Jukebox, SoundStream), the remedy for codes no input is near. Returns how many moved."""
        index = dead.nonzero().flatten()
        if index.numel() == 0 or latents.shape[0] == 0:
            return 0
        pick = torch.randint(0, latents.shape[0], (index.numel(),), generator=generator, device=latents.device)
        self.embedding.weight[index] = latents[pick].to(self.embedding.weight.dtype)
        return int(index.numel())

    def lookup(self, codes: Tensor) -> Tensor:
        """Integer codes (B, h, w) -> the float32 vectors (B, D, h, w) the decoder reads: exact decoding."""
        if codes.dtype.is_floating_point:
            raise TypeError(f"codes must be integers, got {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.num_codes):
            raise ValueError(f"codes range over [{int(codes.min())}, {int(codes.max())}], outside this "
                             f"codebook's [0, {self.num_codes - 1}]: codes of another tokenizer?")
        with _no_autocast(codes.device.type):
            vectors = self.codebook()[codes.long()]  # (B, h, w, D)
        return vectors.permute(0, 3, 1, 2).contiguous()  # (B, D, h, w)
