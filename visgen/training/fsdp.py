"""FSDP2 for every paradigm: shard each transformer block, the net and its EMA alike.

`FSDP2Strategy` is Lightning's `ModelParallelStrategy` (the FSDP2 / DTensor path) with a one-dimensional
data-parallel mesh over all ranks, so it is plain fully sharded data parallelism: no tensor parallelism,
every rank sees different samples. `GenerativeModule.configure_model` calls `shard_net` on the net and on
its EMA with the same mesh and policy, so the EMA's shards sit beside the net's and `ema_update` updates
them shard by shard without gathering; sampling runs the sharded EMA on every rank (FSDP2 gathers each
block's parameters for its forward). Checkpoints are DCP folders (one file per rank plus `meta.pt`),
written to a temporary folder and renamed, so a kill mid-save never leaves a partial checkpoint under its
final name.

The units FSDP shards are the elements of every `nn.ModuleList` whose attribute name ends in `blocks`
(README: "Adding a paradigm"): DiT's `blocks`, MAR's encoder/decoder blocks, the GPT's layers, ...
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from visgen.sampling import RESHARD_AFTER_FORWARD_ATTR

log = logging.getLogger(__name__)

__all__ = ["FSDP2Strategy", "shard_units", "shard_net", "DTYPES"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, None: None}


def shard_units(net: nn.Module) -> list[nn.Module]:
    """The transformer blocks of `net`: the elements of every ModuleList attribute named `*blocks`."""
    units: list[nn.Module] = []
    for name, module in net.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1].endswith("blocks"):
            units.extend(module)
    return units


def shard_net(net: nn.Module, mesh: Any, param_dtype: str | None = "bf16", reduce_dtype: str | None = "fp32",
              activation_checkpointing: bool = False, reshard_after_forward: bool = True) -> nn.Module:
    """`fully_shard` each block of `net`, then the net itself (its embeddings and head), in place.

    `param_dtype`/`reduce_dtype` set FSDP2's mixed precision (bf16 compute, fp32 gradient reduction by
    default; the sharded master weights stay fp32). `activation_checkpointing` recomputes each block's
    activations in the backward pass (less memory, ~1/3 more compute).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    units = shard_units(net)
    if not units:
        raise ValueError(f"{type(net).__name__} has no nn.ModuleList named '*blocks', so FSDP has nothing to shard "
                         "block by block; keep the transformer blocks in such a list (README: Adding a paradigm)")
    if activation_checkpointing:
        _wrap_for_activation_checkpointing(net)
        units = shard_units(net)
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype])
    for unit in [*units, net]:
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        setattr(unit, RESHARD_AFTER_FORWARD_ATTR, reshard_after_forward)  # restored after sampling (`gathered`)
    return net


def _wrap_for_activation_checkpointing(net: nn.Module) -> None:
    """Replace every block by a non-reentrant checkpoint wrapper (state-dict keys are unchanged)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for name, module in list(net.named_modules()):
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1].endswith("blocks"):
            for index, block in enumerate(module):
                module[index] = checkpoint_wrapper(block)


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallelism (FSDP2) over every rank of every node, with atomic DCP checkpoints.

    Lightning's ModelParallelStrategy builds a (data_parallel, tensor_parallel) mesh and, with its defaults,
    puts the ranks of a node on the tensor-parallel axis; visgen's nets have no tensor-parallel plan, so
    here the data-parallel axis spans the world and the tensor-parallel axis has size 1.
    """

    def __init__(self, param_dtype: str | None = "bf16", reduce_dtype: str | None = "fp32",
                 activation_checkpointing: bool = False, reshard_after_forward: bool = True,
                 save_distributed_checkpoint: bool = True, **kwargs: Any) -> None:
        for key, value in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
            if value not in DTYPES:
                raise ValueError(f"trainer.strategy.{key}={value!r} is not one of {sorted(map(str, DTYPES))}")
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.shard_kwargs = {"param_dtype": param_dtype, "reduce_dtype": reduce_dtype,
                             "activation_checkpointing": activation_checkpointing,
                             "reshard_after_forward": reshard_after_forward}

    def setup_environment(self) -> None:
        """Every rank on the data-parallel axis (world size x 1 mesh)."""
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    @property
    def data_parallel_mesh(self) -> Any:
        """The one-dimensional mesh the nets are sharded over."""
        return self.device_mesh["data_parallel"]

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Write the DCP folder under a temporary name next to the target, then rename it into place."""
        if not self._save_distributed_checkpoint:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        path = Path(self.broadcast(str(filepath)))
        tmp = path.with_name(f".{path.name}.tmp")
        if self.global_rank == 0 and tmp.exists():
            shutil.rmtree(tmp)  # left by a save that was killed
        self.barrier("fsdp_checkpoint_tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("fsdp_checkpoint_written")
        if self.global_rank == 0:
            # A folder cannot be renamed over a non-empty one: move the previous checkpoint aside first, so at
            # every instant the final name holds either the old or the new complete checkpoint.
            old = path.with_name(f".{path.name}.old")
            _remove(old)
            if path.exists() or path.is_symlink():
                os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        self.barrier("fsdp_checkpoint_renamed")


def _remove(path: Path) -> None:
    """Delete a file, link or folder if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
