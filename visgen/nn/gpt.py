"""LlamaGen's class-conditional GPT (Sun et al., 2024, "Autoregressive Model Beats Diffusion"): a Llama
decoder over raster-ordered VQ codes, prefixed by a class token.

Sequence: [class embedding, code_0, ..., code_{N-2}] -> logits for code_0 .. code_{N-1}. The class
token is LlamaGen's `LabelEmbedder` row (one extra null row for classifier-free guidance, labels
dropped with probability 0.1 in training); tokens get dropout 0.1, the residual and FFN outputs
dropout 0.1 (`train_c2i.py --dropout-p --token-dropout-p`); positions are LlamaGen's 2-D RoPE with
zeroed class-prefix rows (`visgen.nn.rope`); the head is a bias-free linear over the codebook,
zero-initialised as in the official `initialize_weights`.

Sizes (`GPT_SIZES`, LlamaGen's gpt.py `GPT_B` .. `GPT_3B`) and their exact parameter counts:
B 110,888,448; L 342,910,976; XL 774,699,520; XXL 1,410,972,672; 3B 3,096,659,200 (with the 16,384-code
VQ-16 head and 1,000 classes; the grid size changes no parameter).

Official files name the block list `layers` where visgen's FSDP contract needs a name ending in
`blocks`; that rename (and dropping of runtime tensors some files carry) is `official_key_map`,
registered below with `visgen.official` so `load_official("gpt_b", "c2i_B_256.pt")` is strict.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import Tensor, nn

from visgen.nn.embeddings import LabelEmbedder
from visgen.nn.llama import KVCache, LlamaBlock, RMSNorm, llama_ffn_hidden
from visgen.nn.rope import RoPE
from visgen.official import OfficialFormat, StateDict, register_official

__all__ = ["GPT", "GPT_SIZES", "official_key_map", "PREFIX_LEN"]

log = logging.getLogger(__name__)

#: LlamaGen gpt.py: GPT_B .. GPT_3B (n_layer, n_head, dim). XXL and 3B were trained with FSDP.
GPT_SIZES: dict[str, dict[str, int]] = {
    "B": {"depth": 12, "num_heads": 12, "hidden_size": 768},
    "L": {"depth": 24, "num_heads": 16, "hidden_size": 1024},
    "XL": {"depth": 36, "num_heads": 20, "hidden_size": 1280},
    "XXL": {"depth": 48, "num_heads": 24, "hidden_size": 1536},
    "3B": {"depth": 24, "num_heads": 32, "hidden_size": 3200},
}
#: Length of the class prefix (LlamaGen c2i: cls_token_num = 1).
PREFIX_LEN = 1


class GPT(nn.Module):
    """Class-conditional decoder-only transformer over a grid_size x grid_size code grid.

    `forward(codes, labels)` is the training / full-recomputation path; `prefill` and `decode` run the
    same net one position at a time against a `KVCache` from `new_cache` (the sampler's path).
    """

    def __init__(
        self,
        vocab_size: int = 16384,
        grid_size: int = 16,
        hidden_size: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        num_kv_heads: int | None = None,
        multiple_of: int = 256,
        ffn_dim_multiplier: float | None = None,
        rope_base: float = 10000.0,
        norm_eps: float = 1e-5,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        token_dropout: float = 0.1,
        attn_dropout: float = 0.0,
        resid_dropout: float = 0.1,
        ffn_dropout: float = 0.1,
        drop_path_rate: float = 0.0,
        init_std: float = 0.02,
    ):
        super().__init__()
        self.vocab_size, self.grid_size, self.num_classes = vocab_size, grid_size, num_classes
        self.seq_len = grid_size * grid_size
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads or num_heads
        self.head_dim = hidden_size // num_heads
        self.init_std = init_std
        # An unconditional net (num_classes=0) keeps one row: the null row doubles as the start token.
        self.cls_embedding = LabelEmbedder(num_classes, hidden_size, class_dropout_prob if num_classes else 1.0)
        self.tok_embeddings = nn.Embedding(vocab_size, hidden_size)
        self.tok_dropout = nn.Dropout(token_dropout)
        drop_path = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # LlamaGen: linear in depth
        ffn_hidden = llama_ffn_hidden(hidden_size, multiple_of, ffn_dim_multiplier)
        self.blocks = nn.ModuleList([
            LlamaBlock(hidden_size, num_heads, ffn_hidden, num_kv_heads, norm_eps, attn_dropout, resid_dropout,
                       ffn_dropout, drop_path[i]) for i in range(depth)
        ])
        self.norm = RMSNorm(hidden_size, eps=norm_eps)
        self.output = nn.Linear(hidden_size, vocab_size, bias=False)
        self.rope = RoPE.grid_2d(grid_size, self.head_dim, rope_base, PREFIX_LEN)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """LlamaGen: every Linear and Embedding ~ N(0, 0.02), RMSNorm weights 1, the output head zero."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.init_std)
        nn.init.zeros_(self.output.weight)

    # ----- training and full recomputation -------------------------------------------------------
    def forward(self, codes: Tensor, labels: Tensor) -> Tensor:
        """Codes (B, n) int64 with n < seq_len, labels (B,) -> fp32 logits (B, n + 1, V); row i predicts code i.

        Training feeds codes[:, :-1] and reads all N rows. Labels are dropped to the null class with
        probability `class_dropout_prob` in training mode (classifier-free guidance).
        """
        if codes.shape[1] >= self.seq_len:
            raise ValueError(f"GPT got {codes.shape[1]} codes per sample; a {self.grid_size}x{self.grid_size} grid "
                             f"takes at most {self.seq_len - 1} as input (the last code is only predicted)")
        cls = self.cls_embedding(labels, train=self.training)[:, None]  # (B, 1, D)
        h = self.tok_dropout(torch.cat([cls, self.tok_embeddings(codes)], dim=1))  # (B, n + 1, D)
        rope = self.rope(slice(0, h.shape[1]))  # (n + 1, Dh/2, 2)
        for block in self.blocks:
            h = block(h, rope)
        return self.output(self.norm(h)).float()  # (B, n + 1, V)

    # ----- KV-cache inference -----------------------------------------------------------------
    def new_cache(self, batch_size: int, dtype: torch.dtype, device: torch.device | str) -> KVCache:
        """A static cache for one whole sequence (class token + codes), length rounded up to 8 as LlamaGen."""
        max_len = -(-(PREFIX_LEN + self.seq_len) // 8) * 8
        return KVCache(len(self.blocks), batch_size, self.num_kv_heads, self.head_dim, max_len, dtype, device)

    def _cached_step(self, h: Tensor, input_pos: Tensor, cache: KVCache) -> Tensor:
        """Embeddings (B, L, D) at positions input_pos (L,) -> fp32 logits of the last one (B, V)."""
        h = self.tok_dropout(h)
        rope, mask = self.rope(input_pos), cache.mask(input_pos)  # (L, Dh/2, 2), (1, 1, L, S)
        for i, block in enumerate(self.blocks):
            h = block(h, rope, cache.layer(i), input_pos, mask)
        return self.output(self.norm(h[:, -1])).float()  # (B, V)

    def prefill(self, labels: Tensor, cache: KVCache) -> Tensor:
        """Write the class token (position 0) into the cache; logits for code 0 (B, V)."""
        cls = self.cls_embedding(labels, train=False)[:, None]  # (B, 1, D)
        return self._cached_step(cls, torch.arange(PREFIX_LEN, device=labels.device), cache)

    def decode(self, codes: Tensor, input_pos: Tensor, cache: KVCache) -> Tensor:
        """Feed code i (B,) at position input_pos = (i + 1,) (a tensor: one compiled graph for every step);
        logits for code i + 1 (B, V)."""
        return self._cached_step(self.tok_embeddings(codes[:, None]), input_pos, cache)


# ----- official checkpoints ----------------------------------------------------------------------------
_LAYERS = re.compile(r"^layers\.(\d+)\.")
#: Runtime tensors that some LlamaGen files carry but that are not weights: the 2-D RoPE table (a plain
#: attribute, stored by early versions; sample_c2i.py pops it) and the KV caches that `setup_caches`
#: registers as buffers (a file saved after sampling holds them). visgen rebuilds the table and keeps
#: caches outside the net, so they are dropped, by name.
_RUNTIME_KEYS = re.compile(r"^(freqs_cis|causal_mask|layers\.\d+\.attention\.kv_cache\.[kv]_cache)$")


def official_key_map(state: StateDict) -> StateDict:
    """LlamaGen names -> visgen names: `layers.N.` -> `blocks.N.` (FSDP shards `*blocks`); runtime tensors
    `freqs_cis`, `causal_mask` and `layers.N.attention.kv_cache.{k,v}_cache` are dropped (not weights).
    Everything else (`tok_embeddings`, `cls_embedding.embedding_table`, `attention.wqkv/wo`,
    `feed_forward.w1/w2/w3`, `attention_norm`, `ffn_norm`, `norm`, `output`) keeps its name. visgen
    checkpoints already use `blocks.` and pass through unchanged."""
    dropped = sorted(k for k in state if _RUNTIME_KEYS.match(k))
    if dropped:
        log.info("dropped %d runtime tensors that are not weights: %s", len(dropped), dropped[:4])
    return {_LAYERS.sub(r"blocks.\1.", k): v for k, v in state.items() if k not in dropped}


# LlamaGen's DDP script saves {"model", "optimizer", "steps", "args"} ("ema" only with --ema; the released
# weights are the raw model), DeepSpeed {"module"}, the FSDP script a raw state dict.
register_official(GPT, OfficialFormat(key_map=official_key_map, ema_entries=("ema",),
                                      raw_entries=("model", "module", "state_dict")))
