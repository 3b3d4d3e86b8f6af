"""Reading files a stranger may have sent: checkpoints and the configs stored inside them.

Two rules keep such a file from running code:

* `load_torch_file` reads torch files with `weights_only=True` only (tensors and containers; no pickled
  objects) and turns every failure into one error naming the file and what was expected. It never repeats
  torch's advice to retry with `weights_only=False`, which would run whatever the file holds.
* `instantiate_untrusted` builds a config node read from a file (a checkpoint's net, tokenizer or sampler)
  only when every `_target_` in it, nested ones included, is a class defined inside the `visgen` package and
  a subclass of what that place needs: `nn.Module` for nets, `Tokenizer` for tokenizers, `Sampler` for
  samplers. Nested targets (a sampler's interpolant or diffusion, a net's sub-module) must subclass a
  component base: nn.Module, Tokenizer, Sampler, Interpolant, GaussianDiffusion, or a base a paradigm adds
  with `allow_component_base(cls)` beside its class. Functions, `_partial_` nodes and OmegaConf
  interpolations are refused. A weights-only load alone does not protect against a config: Hydra's
  `instantiate` calls any importable callable it names (`numpy.savetxt` writes a file of the sender's choosing).

Classes of visgen are trusted code; their arguments are data.
"""

from __future__ import annotations

import importlib
import inspect
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from visgen.errors import MissingInputError, UserError

__all__ = ["UntrustedFileError", "UnsafeConfigError", "load_torch_file", "check_targets", "instantiate_untrusted",
           "allow_component_base", "ROLES"]

#: The package whose classes a file's config may name.
TRUSTED_PACKAGE = "visgen"


class UntrustedFileError(UserError, ValueError):
    """A file that is not what the entry point reads (not a checkpoint, unreadable, unsafe contents)."""


class UnsafeConfigError(UntrustedFileError):
    """A config read from a file names a target outside visgen, or of the wrong kind."""


def _role_bases() -> dict[str, tuple[type, ...]]:
    from visgen.sampling import Sampler
    from visgen.tokenizers.base import Tokenizer

    return {"net": (nn.Module,), "tokenizer": (Tokenizer,), "sampler": (Sampler,)}


def _component_bases() -> tuple[type, ...]:
    from visgen.diffusion.gaussian import GaussianDiffusion
    from visgen.diffusion.interpolants import Interpolant
    from visgen.sampling import Sampler
    from visgen.tokenizers.base import Tokenizer

    return (nn.Module, Tokenizer, Sampler, Interpolant, GaussianDiffusion, *_EXTRA_COMPONENT_BASES)


#: The places a file's config builds; `_role_bases` gives what each top-level `_target_` must subclass.
ROLES = ("net", "tokenizer", "sampler")
_EXTRA_COMPONENT_BASES: list[type] = []


def allow_component_base(cls: type) -> type:
    """Allow visgen subclasses of `cls` as nested targets in configs read from files (usable as a decorator)."""
    if not cls.__module__.startswith(f"{TRUSTED_PACKAGE}."):
        raise ValueError(f"only visgen classes can be allowed as component bases, not {cls.__module__}.{cls.__name__}")
    if cls not in _EXTRA_COMPONENT_BASES:
        _EXTRA_COMPONENT_BASES.append(cls)
    return cls


# ----- torch files ---------------------------------------------------------------------------------
def load_torch_file(path: str | Path, what: str, expected: str, safe_globals: tuple[type, ...] = (),
                    mmap: bool = False, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load(path, weights_only=True)` (on the CPU by default). Any failure is an `UntrustedFileError`
    naming the file, the option that named it (`what`, e.g. "ckpt=") and what such a file looks like (`expected`)."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{what}{path}: no such file; expected {expected}")
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - every reader error means the same thing here: not such a file
        raise UntrustedFileError(f"{what}{path} is not a readable checkpoint ({_reason(err)}); expected {expected}"
                                 ) from None  # torch's message would suggest weights_only=False


def _reason(err: Exception) -> str:
    """A short reason for a failed weights-only load, without torch's advice to disable the protection."""
    message = str(err)
    if "Unsupported global" in message:  # a pickle naming a Python object: say which, never how to allow it
        name = message.split("Unsupported global:", 1)[1].strip().split()[1:2] or ["?"]
        return f"it pickles the Python object {name[0].rstrip(',')}, which a weights-only load refuses"
    if "zip archive" in message or "central directory" in message:
        return "not a zip archive: truncated or not written by torch.save"
    if isinstance(err, (pickle.UnpicklingError, IndexError, EOFError, UnicodeDecodeError)):
        return "not a torch file"
    return type(err).__name__


# ----- configs read from files ---------------------------------------------------------------------
def _walk(node: Any, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every dict (with its dotted path) of a plain config container, depth first, lists included."""
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")
    elif isinstance(node, str) and "${" in node:
        raise UnsafeConfigError(f"{path}={node!r} is an interpolation; configs stored in files are resolved, so "
                                "this one was not written by visgen")


def _locate_visgen_class(target: Any, where: str) -> type:
    """The class a `_target_` names, importing only visgen modules; refuses anything else."""
    if not isinstance(target, str) or not (target == TRUSTED_PACKAGE or target.startswith(f"{TRUSTED_PACKAGE}.")):
        raise UnsafeConfigError(f"{where}._target_={target!r} is not a visgen class; only classes inside the visgen "
                                "package are built from a file's config")
    parts = target.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for part in parts[split:]:
            obj = getattr(obj, part, None)
        break
    else:
        obj = None
    if not inspect.isclass(obj) or not obj.__module__.startswith(f"{TRUSTED_PACKAGE}."):
        kind = "does not exist" if obj is None else f"is not a class defined in visgen ({obj!r})"
        raise UnsafeConfigError(f"{where}._target_={target!r} {kind}; only classes inside the visgen package are "
                                "built from a file's config")
    return obj


def check_targets(node: DictConfig, role: str, source: str, where: str) -> None:
    """Refuse `node` unless all its `_target_`s are visgen classes: the top one a subclass of `role`'s base
    ("net", "tokenizer", "sampler"), nested ones of a component base. `source` names the file in errors,
    `where` the node's place in the config."""
    bases = _role_bases()[role]
    components = _component_bases()
    try:
        container = OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig) else node
        if not isinstance(container, dict) or "_target_" not in container:
            raise UnsafeConfigError(f"{where} has no _target_ (got {type(node).__name__})")
        for path, sub in _walk(container, where):
            if "_partial_" in sub:
                raise UnsafeConfigError(f"{path} sets _partial_, which a file's config may not use")
            if "_target_" not in sub:
                continue
            cls = _locate_visgen_class(sub["_target_"], path)
            need = bases if path == where else components
            if not issubclass(cls, need):
                names = " or ".join(b.__name__ for b in need)
                raise UnsafeConfigError(f"{path}._target_={sub['_target_']!r} is not a {names} subclass, which is "
                                        f"what {path} must build")
    except UnsafeConfigError as err:
        raise UnsafeConfigError(f"{source}: refusing its config: {err}") from None


def instantiate_untrusted(node: DictConfig, role: str, source: str, where: str, **kwargs: Any) -> Any:
    """Check `node` with `check_targets`, then `hydra.utils.instantiate` it (with `kwargs`)."""
    from hydra.utils import instantiate

    check_targets(node, role, source, where)
    return instantiate(node, **kwargs)
