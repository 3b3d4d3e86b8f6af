"""REPA's network: the SiT backbone (`visgen.nn.dit.DiT`, no learned Σ) plus one MLP projector per encoder.

REPA (Yu et al., ICLR 2025, "Representation Alignment for Generation: Training Diffusion Transformers Is Easier
Than You Think", code sihyun-yu/REPA `models/sit.py`) projects the tokens after block `encoder_depth` with
h_φ = Linear(D, 2048) → SiLU → Linear(2048, 2048) → SiLU → Linear(2048, z_dim), one per frozen encoder, and
aligns them with the encoder's patch features (`visgen.paradigms.repa`). Sampling never runs the projectors.

Time convention. REPA's code uses t = 1 for noise, x_t = (1 − t) x + t ε and predicts v = ε − x; visgen's
(README convention 7) is t = 1 for data and v = x − ε. With `time_convention="repa"` (the default, and the
layout of every released REPA checkpoint) the backbone keeps REPA's parametrisation and `forward` converts at
its edge: it is called with visgen's time t, feeds the backbone 1 − t and returns minus its output. So the net
*is* visgen's velocity field (every sampler of the `sampling` group runs it unchanged), while its weights stay
interchangeable with REPA's `train.py`/`generate.py` in both directions. The conversion is exact for a velocity
net only (noise and data targets keep their sign); `time_convention="visgen"` runs the backbone in visgen's own
time, for other predictions (the digits demo's x-prediction).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import Tensor, nn

from visgen.nn.dit import DiT
from visgen.official import OfficialFormat, StateDict, register_official

__all__ = ["REPASiT", "TIME_CONVENTIONS", "build_projector", "renumber_legacy_blocks"]

TIME_CONVENTIONS = ("repa", "visgen")


def build_projector(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """REPA's 3-layer SiLU MLP h_φ: (…, D) -> (…, z_dim); keys `0`, `2`, `4` as in the released files."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


class REPASiT(DiT):
    """SiT (velocity, 4 output channels, no learned Σ) whose tokens after `encoder_depth` blocks feed projectors.

    `z_dims` holds one feature width per alignment encoder (DINOv2-B: 768), `projector_dim` the projectors'
    hidden width (REPA: 2048). The remaining arguments are `DiT`'s.
    """

    def __init__(
        self,
        *,
        encoder_depth: int = 8,
        z_dims: Sequence[int] = (768,),
        projector_dim: int = 2048,
        time_convention: str = "repa",
        **dit_kwargs,
    ) -> None:
        if dit_kwargs.pop("learn_sigma", False):
            raise ValueError("REPA's SiT has no learned-Σ channels (models/sit.py: out_channels = in_channels); "
                             "drop learn_sigma from model.net")
        if time_convention not in TIME_CONVENTIONS:
            raise ValueError(f"model.net.time_convention={time_convention!r}; allowed: {', '.join(TIME_CONVENTIONS)}")
        super().__init__(learn_sigma=False, **dit_kwargs)
        if not 1 <= encoder_depth <= len(self.blocks):
            raise ValueError(f"model.net.encoder_depth={encoder_depth} must lie in [1, depth={len(self.blocks)}]: "
                             "the projectors read the tokens after that many blocks")
        if not z_dims or any(int(z) < 1 for z in z_dims):
            raise ValueError(f"model.net.z_dims={list(z_dims)} needs one positive feature width per encoder")
        self.encoder_depth = encoder_depth
        self.z_dims = [int(z) for z in z_dims]
        self.time_convention = time_convention
        hidden_size = self.pos_embed.shape[-1]
        self.projectors = nn.ModuleList([build_projector(hidden_size, projector_dim, z) for z in self.z_dims])
        for module in self.projectors.modules():  # REPA's _basic_init covers the projectors too
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, project: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """x (B, C, H, W), visgen time t (B,) (t = 1 data), y (B,) -> visgen's prediction (B, C, H, W); with
        `project=True` also the projected tokens after block `encoder_depth`, one (B, L, z_dim) per encoder."""
        repa_time = self.time_convention == "repa"
        out, hidden = self.forward_with_hidden(x, 1.0 - t if repa_time else t, y,
                                               self.encoder_depth if project else None)
        if repa_time:
            out = -out  # (B, C, H, W): REPA's ε − x -> visgen's x − ε
        if not project:
            return out
        return out, [projector(hidden) for projector in self.projectors]  # (B, L, z_dim) each


_LEGACY_DECODER = re.compile(r"^decoder_blocks\.(\d+)\.")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def renumber_legacy_blocks(state: StateDict) -> StateDict:
    """Early REPA checkpoints (generate.py --legacy) name the blocks after `encoder_depth` `decoder_blocks.{i}`;
    they are `blocks.{encoder_depth + i}` now. encoder_depth is the number of `blocks.*` in the file (REPA's
    `load_legacy_checkpoints` takes it as an argument). Files without `decoder_blocks` pass unchanged."""
    if not any(_LEGACY_DECODER.match(k) for k in state):
        return state
    encoder_blocks = {int(m.group(1)) for k in state if (m := _BLOCK.match(k))}
    if not encoder_blocks:
        raise ValueError("a legacy REPA checkpoint with decoder_blocks.* but no blocks.*: cannot tell its "
                         "encoder_depth; the file is not a REPA SiT checkpoint")
    offset = max(encoder_blocks) + 1
    return {(_LEGACY_DECODER.sub(lambda m: f"blocks.{int(m.group(1)) + offset}.", k)): v for k, v in state.items()}


# Released REPA files: the generate.py download is a raw state dict, train.py's checkpoints are
# {"model", "ema", "opt", "args", "steps"} (the EMA is loaded); names are visgen's apart from the legacy blocks.
register_official(REPASiT, OfficialFormat(key_map=renumber_legacy_blocks, ema_entries=("ema",),
                                          raw_entries=("model",)))
