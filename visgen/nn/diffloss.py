"""MAR's Diffusion Loss (Li et al. 2024, Sec. 3.2-3.3): a small adaLN MLP models p(x | z) of one continuous token.

    L(z, x) = E_{ε, t} ‖ε − ε_θ(x_t | t, z)‖² (+ L_vb for the learned Σ),   x_t = √ᾱ_t x + √(1 − ᾱ_t) ε

per token, with z the MAE decoder's output at that token's position (Eq. 1-2). The process is the project's one
Gaussian diffusion (`visgen.diffusion.gaussian.GaussianDiffusion`: cosine schedule, 1000 steps, ε prediction,
learned Σ, the hybrid loss), the same DiT trains, here on tensors (N, D) instead of images. Sampling (Eq. 3-4)
respaces it to `num_sampling_steps` and runs ancestral DDPM steps (`DDPMSampler.step`) with a temperature τ
scaling the per-step noise, and optional CFG on ε (all D channels) between conditional and unconditional z.

Parameter names are the official `models/diffloss.py` ones (`net.time_embed`, `net.cond_embed`, `net.input_proj`,
`net.res_blocks.i.{in_ln,mlp,adaLN_modulation}`, `net.final_layer`), so released MAR checkpoints load unrenamed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from visgen.diffusion.gaussian import GaussianDiffusion
from visgen.diffusion.gaussian_samplers import DDPMSampler
from visgen.nn.adaln import AdaLNFinalLayer, modulate
from visgen.nn.embeddings import TimestepEmbedder

__all__ = ["DiffLoss", "SimpleMLPAdaLN", "ResBlock"]


class ResBlock(nn.Module):
    """x + gate · MLP(modulate(LN(x), shift, scale)), the three regressed from the condition y (adaLN)."""

    def __init__(self, channels: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """x (N, W), y (N, W) -> (N, W)."""
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)  # (N, W) each
        h = modulate(self.in_ln(x).unsqueeze(1), shift, scale).squeeze(1)  # (N, W)
        return x + gate * self.mlp(h)  # (N, W)


class SimpleMLPAdaLN(nn.Module):
    """ε_θ(x_t | t, z): input projection, `depth` adaLN residual MLP blocks of width `width`, DiT's final layer.

    Called as a Gaussian-diffusion net `net(x_t (N, D), t (N,) original step, z (N, Z)) -> (N, 2D)` (ε and the
    learned-Σ interpolation v).
    """

    def __init__(self, in_channels: int, width: int, out_channels: int, z_channels: int, depth: int,
                 grad_checkpointing: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.grad_checkpointing = grad_checkpointing
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(z_channels, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.res_blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.final_layer = AdaLNFinalLayer(width, patch_size=1, out_channels=out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Official init: xavier-uniform linears, N(0, 0.02) time MLP, zero adaLN regressors and output."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        self.final_layer.zero_init()

    def forward(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        """x (N, D), t (N,), c (N, Z) -> (N, 2D)."""
        x = self.input_proj(x)  # (N, W)
        y = self.time_embed(t) + self.cond_embed(c)  # (N, W)
        for block in self.res_blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, y, use_reentrant=False)
            else:
                x = block(x, y)
        return self.final_layer(x.unsqueeze(1), y).squeeze(1)  # (N, 2D)


class DiffLoss(nn.Module):
    """The per-token diffusion loss and sampler of MAR around a `SimpleMLPAdaLN` (`self.net`)."""

    def __init__(self, target_channels: int, z_channels: int, depth: int, width: int,
                 num_sampling_steps: int = 100, grad_checkpointing: bool = False,
                 diffusion: GaussianDiffusion | None = None):
        """`diffusion` defaults to MAR's: cosine β, T = 1000, learned Σ (official `create_diffusion(noise_schedule=
        "cosine")`); `num_sampling_steps` (official "100") respaces it for sampling."""
        super().__init__()
        self.in_channels = target_channels
        self.net = SimpleMLPAdaLN(target_channels, width, 2 * target_channels, z_channels, depth, grad_checkpointing)
        self.train_diffusion = diffusion or GaussianDiffusion(1000, "cosine", learn_sigma=True)
        self.num_sampling_steps = int(num_sampling_steps)
        self._samplers: dict[tuple[int, float, bool], DDPMSampler] = {}

    def forward(self, target: Tensor, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Per-token hybrid loss (N,) of targets (N, D) given conditions (N, Z); t then ε from `generator`."""
        return self.train_diffusion.training_losses(self.net, target, z, generator=generator)["loss"]  # (N,)

    def ddpm(self, temperature: float, num_steps: int | None = None, clip_denoised: bool = False) -> DDPMSampler:
        """The respaced ancestral sampler (cached per (steps, temperature, clip)): its `step` is the reverse update."""
        key = (int(num_steps or self.num_sampling_steps), float(temperature), bool(clip_denoised))
        if key not in self._samplers:
            self._samplers[key] = DDPMSampler(key[0], temperature=key[1], clip_denoised=key[2],
                                              diffusion=self.train_diffusion)
        return self._samplers[key]

    def guided_net_output(self, x: Tensor, t: Tensor, z: Tensor, cfg: float) -> Tensor:
        """Net output (N, 2D) at original steps t; with cfg != 1, z is (2N, Z) [conditional; unconditional] and
        ε = ε_u + cfg (ε_c − ε_u) on all D channels, the learned-Σ half from the conditional z (official
        `forward_with_cfg`)."""
        if cfg == 1.0:
            return self.net(x, t, z)  # (N, 2D)
        n = x.shape[0]
        out = self.net(torch.cat([x, x]), torch.cat([t, t]), z)  # (2N, 2D)
        eps_c, eps_u = out[:n, : self.in_channels], out[n:, : self.in_channels]  # (N, D) each
        return torch.cat([eps_u + cfg * (eps_c - eps_u), out[:n, self.in_channels:]], dim=1)  # (N, 2D)

    @torch.no_grad()
    def sample(self, z: Tensor, temperature: float = 1.0, cfg: float = 1.0, generator: torch.Generator | None = None,
               num_steps: int | None = None, noise: Tensor | None = None, clip_denoised: bool = False) -> Tensor:
        """Tokens (N, D) ~ p(x | z) by ancestral sampling; z is (N, Z), or (2N, Z) [cond; uncond] with cfg != 1.

        x_T ~ N(0, I) (or `noise`) is shared by both halves, as the official sampler; every step's noise comes
        from `generator` and is scaled by `temperature`. `clip_denoised` clamps each step's x̂_0 to [-1, 1]: off in
        MAR (KL latents are unbounded); for bounded tokens such as pixels, as ADM samples its pixel models.
        """
        sampler = self.ddpm(temperature, num_steps, clip_denoised)
        n = z.shape[0] if cfg == 1.0 else z.shape[0] // 2
        if cfg != 1.0 and z.shape[0] != 2 * n:
            raise ValueError(f"with cfg={cfg} z must stack conditional and unconditional rows, got {z.shape[0]} rows")
        if noise is None:  # the chain runs in at least fp32, also when z comes from a bf16 autocast decoder
            dtype = torch.promote_types(z.dtype, torch.float32)
            noise = torch.randn(n, self.in_channels, generator=generator, device=z.device, dtype=dtype)  # (N, D)
        x = noise
        d = sampler.diffusion
        for i in reversed(range(d.num_timesteps)):
            t = torch.full((n,), i, dtype=torch.int64, device=z.device)  # (N,) respaced step
            out = self.guided_net_output(x, d.net_timesteps(t), z, cfg).to(x.dtype)  # (N, 2D)
            x = sampler.step(out, x, t, generator)  # (N, D)
        return x
