"""Sharded (DCP) checkpoints, as `trainer=fsdp` writes them: check that they run no code, read them whole.

A sharded checkpoint is a folder: `.metadata` (torch's DCP index), one `__<rank>_0.distcp` file per rank,
and Lightning's `meta.pt` (everything but weights and optimizer states: step, loops, visgen metadata, RNG
states). Torch reads `.metadata` with plain `pickle.load`, and non-tensor entries (optimizer param groups)
with `torch.load(weights_only=False)`, so a crafted folder would run code on load. Before anything loads
one, `verify_sharded_checkpoint` unpickles the index with an allowlist of DCP's own metadata classes and
reads every non-tensor entry with `weights_only=True`; `load_sharded_checkpoint` then assembles the full
tensors on one process (evaluation, conversion), itself reading with those safe readers.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from visgen.untrusted import UntrustedFileError

__all__ = ["META_FILE", "is_sharded_checkpoint", "verify_sharded_checkpoint", "load_sharded_checkpoint",
           "UnsafeCheckpointError"]

META_FILE = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint
INDEX_FILE = ".metadata"  # torch.distributed.checkpoint's index

#: (module, name) pairs a DCP index may reference: torch's own metadata records and plain values.
_INDEX_ALLOWLIST = {
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("collections", "OrderedDict"),
}


class UnsafeCheckpointError(UntrustedFileError):
    """A checkpoint that would run code, or is not a checkpoint visgen wrote."""


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A folder holding a DCP index and Lightning's meta.pt."""
    path = Path(path)
    return path.is_dir() and (path / INDEX_FILE).is_file() and (path / META_FILE).is_file()


class _IndexUnpickler(pickle.Unpickler):
    """Unpickles a DCP index, refusing every global outside the allowlist (dtypes by name are fine)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _INDEX_ALLOWLIST or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                   torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"the DCP index references {module}.{name}, which a checkpoint written by "
                                    "torch.distributed.checkpoint never does; refusing to load it")


def _read_index(path: Path) -> Any:
    try:
        with open(path / INDEX_FILE, "rb") as stream:
            return _IndexUnpickler(stream).load()
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpointError(f"{path}: {err}") from err
    except Exception as err:  # truncated or not a pickle at all
        raise UnsafeCheckpointError(f"{path}/{INDEX_FILE} is not a readable DCP index ({type(err).__name__}: "
                                    f"{err}); the checkpoint is damaged or was not written by visgen") from err


def _safe_reader(path: Path) -> Any:
    """torch's FileSystemReader with the index read through the allowlist."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("rank") is not None:
                raise UnsafeCheckpointError(f"{path}: per-rank DCP indexes are not supported")
            metadata = _read_index(path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def verify_sharded_checkpoint(path: str | Path) -> None:
    """Raise `UnsafeCheckpointError` unless every pickled part of the folder loads without running code."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise UnsafeCheckpointError(f"{path} is not a sharded checkpoint folder (it needs {INDEX_FILE} and "
                                    f"{META_FILE})")
    index = _read_index(path)
    for fqn, entry in index.state_dict_metadata.items():
        if not isinstance(entry, BytesStorageMetadata):
            continue
        info = index.storage_data.get(_bytes_index(fqn))
        if info is None:
            raise UnsafeCheckpointError(f"{path}: the index lists {fqn!r} but no storage for it")
        shard = (path / str(info.relative_path)).resolve()
        if shard.parent != path.resolve():
            raise UnsafeCheckpointError(f"{path}: entry {fqn!r} points outside the checkpoint folder ({shard})")
        with open(shard, "rb") as stream:
            stream.seek(info.offset)
            payload = io.BytesIO(stream.read(info.length))
        try:
            torch.load(payload, map_location="cpu", weights_only=True)
        except Exception as err:
            raise UnsafeCheckpointError(f"{path}: entry {fqn!r} does not load with weights_only=True "
                                        f"({type(err).__name__}: {err}); refusing the checkpoint") from err
    try:
        torch.load(path / META_FILE, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UnsafeCheckpointError(f"{path}/{META_FILE} does not load with weights_only=True ({type(err).__name__}:"
                                    f" {err}); refusing the checkpoint") from err


def _bytes_index(fqn: str) -> Any:
    from torch.distributed.checkpoint.metadata import MetadataIndex

    return MetadataIndex(fqn)


def load_sharded_checkpoint(path: str | Path, prefixes: tuple[str, ...] = ("state_dict.",)) -> dict[str, Any]:
    """The checkpoint as one dict, like a single-file `.ckpt`: meta.pt's entries plus `state_dict` with full
    (unsharded) tensors of the entries whose flattened name starts with one of `prefixes` (none: metadata only).

    Runs on a single process without a process group; the folder is verified first.
    """
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = Path(path)
    verify_sharded_checkpoint(path)
    checkpoint = torch.load(path / META_FILE, map_location="cpu", weights_only=True)
    checkpoint["state_dict"] = {}
    if not prefixes:
        return checkpoint  # metadata only (config, step): no tensor is read
    index = _read_index(path)
    keys = [fqn for fqn in index.state_dict_metadata if fqn.startswith(prefixes)]

    class SafePlanner(_EmptyStateDictLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:  # torch's default: weights_only=False
            self.state_dict[read_item.dest_index.fqn] = torch.load(value, map_location="cpu", weights_only=True)

    flat: dict[str, Any] = {}
    _load_state_dict(flat, storage_reader=_safe_reader(path), planner=SafePlanner(keys=keys), no_dist=True)
    checkpoint["state_dict"] = {k[len("state_dict."):]: v for k, v in _flatten(flat).items()
                                if k.startswith("state_dict.")}
    return checkpoint


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": x}} -> {"a.b": x} (the empty-state-dict planner rebuilds the nesting it saved)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        flat.update(_flatten(value, f"{name}.") if isinstance(value, dict) else {name: value})
    return flat
