"""Load official checkpoints into visgen nets, strictly, and start runs from them: the generic machinery.

Two entry points:

* `load_official(experiment, path)` builds `cfg.model.net` of a preset on the meta device and assigns
  a released file's tensors into it: every key of the file used, every shape checked, nothing left
  over. It reads raw state dicts (the released DiT-XL/2 256/512 and SiT-XL/2 files), the official
  training scripts' checkpoints (`{"model", "ema", "opt", "args"}`, EMA taken when present), visgen
  `.ckpt` files (EMA) and `.safetensors`.
* `init_net_from(net, ema, path, experiment)` copies such weights (or a visgen checkpoint's `net.`
  and `ema.` weights) into an already built net and its EMA: the body of `model.init_from`, a new
  run from given weights with a fresh optimizer (unlike a resume).

A file whose layout does not fit is refused with up to five differing keys and the presets whose
layout it does fit. What differs between families (which checkpoint entries hold the EMA and the raw
weights, how official key names map onto visgen's) is an `OfficialFormat` that each family registers beside
its own net class with `register_official(NetClass, OfficialFormat(...))`; this file holds no family's
quirks. Nets without a registration (DiT and SiT, whose names `visgen.nn.dit.DiT` keeps) use the default:
names unchanged, EMA under "ema", raw weights under "model".
"""

from __future__ import annotations

import argparse
import functools
import itertools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from visgen.untrusted import load_torch_file

log = logging.getLogger(__name__)

__all__ = [
    "CONF_DIR",
    "LayoutMismatchError",
    "LayoutDiff",
    "compose_experiment",
    "known_experiments",
    "preset_layout",
    "matching_experiments",
    "read_checkpoint",
    "official_state_dict",
    "OfficialFormat",
    "register_official",
    "official_format",
    "load_strict",
    "load_official",
    "init_net_from",
]

#: The Hydra tree the presets live in (the repository's `conf/`, beside the package).
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
#: Wrapper prefixes that DDP (`module.`) and torch.compile (`_orig_mod.`) put before every key.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: What a weights file looks like, for error messages.
WEIGHTS_FILES = ("a released state dict (.pt/.pth), an official training-script checkpoint, a visgen .ckpt or a "
                 ".safetensors file")
#: How many differing keys an error names.
MAX_NAMED_KEYS = 5

Shape = tuple[int, ...]
StateDict = dict[str, Tensor]
KeyMap = Callable[[StateDict], StateDict]


class LayoutMismatchError(ValueError):
    """A weights file whose keys or shapes do not fit the net it is loaded into."""


# ----- presets: their configs and expected layouts ------------------------------------------------
@contextmanager
def _hydra_on_conf_dir() -> Iterator[None]:
    """Initialise Hydra on CONF_DIR, also inside a running Hydra app (train.py), restoring its state after."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    if not CONF_DIR.is_dir():
        raise FileNotFoundError(f"the Hydra config tree {CONF_DIR} is missing; run from a visgen checkout "
                                "(pip install -e .) so conf/ sits beside the package")
    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            yield
    finally:
        restore_gh_from_backup(backup)


def compose_experiment(experiment: str, overrides: Sequence[str] = ()) -> Any:
    """The composed training config (`conf/train.yaml`) of `experiment=<name>` plus `overrides`."""
    from hydra import compose

    if experiment not in known_experiments():
        raise ValueError(f"unknown experiment {experiment!r}; presets in {CONF_DIR / 'experiment'}: "
                         f"{', '.join(known_experiments())}")
    with _hydra_on_conf_dir():
        return compose("train", overrides=[f"experiment={experiment}", *overrides])


def known_experiments() -> list[str]:
    """Names of every preset in conf/experiment/."""
    return sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def _build_on_meta(cfg: Any) -> nn.Module:
    """Instantiate `cfg.model.net` on the meta device (no memory, no init cost)."""
    from hydra.utils import instantiate

    with torch.device("meta"):
        return instantiate(cfg.model.net)


def _layout(state: Mapping[str, Tensor]) -> dict[str, Shape]:
    """key -> shape of a state dict."""
    return {k: tuple(v.shape) for k, v in state.items()}


@functools.cache
def preset_layout(experiment: str) -> dict[str, Shape]:
    """key -> shape of the net that `experiment` builds (computed on the meta device, cached)."""
    return _layout(_build_on_meta(compose_experiment(experiment)).state_dict())


def matching_experiments(layout: Mapping[str, Shape], prefer: str | None = None) -> list[str]:
    """Presets whose net has exactly this key -> shape layout; `prefer`'s family listed first."""
    family = _family(prefer) if prefer else None
    names = sorted(known_experiments(), key=lambda name: (_family(name) != family, name))
    matches = []
    for name in names:
        try:
            if preset_layout(name) == dict(layout):
                matches.append(name)
        except Exception as err:  # a preset that does not build is no candidate; test_configs reports it
            log.debug("skipped preset %s while searching for a matching layout: %s", name, err)
    return matches


# ----- comparing layouts ---------------------------------------------------------------------------
@dataclass
class LayoutDiff:
    """What separates a file's key -> shape layout from a net's."""

    missing: list[str] = field(default_factory=list)  # in the net, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the net
    mismatched: list[tuple[str, Shape, Shape]] = field(default_factory=list)  # (key, file shape, net shape)

    @classmethod
    def between(cls, file: Mapping[str, Shape], net: Mapping[str, Shape]) -> LayoutDiff:
        """Compare a file's layout with a net's."""
        return cls(
            missing=[k for k in net if k not in file],
            unexpected=[k for k in file if k not in net],
            mismatched=[(k, tuple(file[k]), tuple(net[k])) for k in net if k in file and file[k] != net[k]],
        )

    @property
    def ok(self) -> bool:
        """True when keys and shapes agree exactly."""
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, net_layout: Mapping[str, Shape], limit: int = MAX_NAMED_KEYS) -> str:
        """Counts of each kind and up to `limit` named keys, taken from every kind in turn."""
        lines = [
            *(f"  missing from the file: {k} {tuple(net_layout[k])}" for k in self.missing),
            *(f"  unexpected in the file: {k}" for k in self.unexpected),
            *(f"  shape mismatch: {k}: file {f} vs net {n}" for k, f, n in self.mismatched),
        ]
        kinds = [lines[: len(self.missing)], lines[len(self.missing): len(self.missing) + len(self.unexpected)],
                 lines[len(self.missing) + len(self.unexpected):]]
        named = [line for line in itertools.chain.from_iterable(itertools.zip_longest(*kinds)) if line][:limit]
        counts = (f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
                  f"{len(self.mismatched)} shape mismatches")
        more = len(lines) - len(named)
        return counts + ":\n" + "\n".join(named) + (f"\n  ... and {more} more" if more else "")


def _numel(layout: Mapping[str, Shape]) -> int:
    """Total number of values of a layout."""
    total = 0
    for shape in layout.values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def _mismatch_error(what: str, target: str, file_layout: Mapping[str, Shape], net_layout: Mapping[str, Shape],
                    experiment: str | None) -> LayoutMismatchError:
    """The error for a file that does not fit: differing keys, sizes, and the presets it does fit."""
    diff = LayoutDiff.between(file_layout, net_layout)
    matches = matching_experiments(file_layout, prefer=experiment)
    if matches:
        alt = " or ".join(f"experiment={m}" for m in matches)
        hint = f"this file matches {alt}; load it with that preset"
    else:
        hint = (f"no preset in {CONF_DIR / 'experiment'} matches its layout; check that the file is a checkpoint "
                "of this model family, or register the family's key mapping with visgen.official.register_official")
    return LayoutMismatchError(
        f"{what} does not fit {target}: the file has {len(file_layout)} tensors ({_numel(file_layout):,} values), "
        f"the net {len(net_layout)} ({_numel(net_layout):,}); {diff.describe(net_layout)}\n{hint}"
    )


# ----- reading files -------------------------------------------------------------------------------
def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Mapping[str, Any]:
    """Read a `.safetensors` file, or a torch file with weights_only=True (argparse args allowed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device=str(map_location))
    # The official training scripts pickle their argparse.Namespace as "args": a plain attribute
    # bag, safe to allow; anything else that is not tensors or containers stays refused.
    obj = load_torch_file(path, "", WEIGHTS_FILES, safe_globals=(argparse.Namespace,), map_location=map_location)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict or checkpoint dict")
    return obj


def _is_state_dict(obj: Mapping[str, Any]) -> bool:
    """A non-empty mapping of names to tensors."""
    return bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def _strip_wrapper_prefixes(state: StateDict, what: str) -> StateDict:
    """Remove `module.`/`_orig_mod.` when every key carries it (DDP / torch.compile wrappers)."""
    stripped = []
    while state:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
        stripped.append(prefix)
    if stripped:
        log.info("%s: stripped the wrapper prefix %s from every key", what, "".join(stripped))
    return state


def _visgen_weights(obj: Mapping[str, Any], prefix: str, what: str) -> StateDict:
    """The `<prefix>`-keyed tensors of a visgen checkpoint's state_dict, prefix removed."""
    state = {k[len(prefix):]: v for k, v in obj["state_dict"].items() if k.startswith(prefix)}
    if not state:
        tops = sorted({k.split(".")[0] for k in obj["state_dict"]})
        raise KeyError(f"{what} has no weights under '{prefix}'; its state_dict holds {tops}")
    return state


def _is_visgen(obj: Mapping[str, Any]) -> bool:
    """A visgen Lightning checkpoint (state_dict + visgen metadata)."""
    return "visgen" in obj and isinstance(obj.get("state_dict"), Mapping)


# ----- per-family formats --------------------------------------------------------------------------
def _identity(state: StateDict) -> StateDict:
    """Official names are visgen's names: nothing to rename."""
    return state


@dataclass(frozen=True)
class OfficialFormat:
    """How one family's released files store a net: which entries hold weights, and its key names.

    `key_map` renames (and may reshape or drop documented extras of) an official state dict into the
    net's own names; it must name every key it drops in its docstring and test. `ema_entries` are tried
    first (the weights sampling uses), then `raw_entries` (with a warning, e.g. LlamaGen's raw "model").
    """

    key_map: KeyMap = _identity
    ema_entries: tuple[str, ...] = ("ema",)
    raw_entries: tuple[str, ...] = ("model",)


DEFAULT_FORMAT = OfficialFormat()
_FORMATS: dict[type, OfficialFormat] = {}


def register_official(net_class: type, official_format: OfficialFormat) -> None:
    """Declare how the released checkpoints of `net_class` (and its subclasses) are read; call it beside the
    class, in the family's own module."""
    _FORMATS[net_class] = official_format


def official_format(net: nn.Module | type) -> OfficialFormat:
    """The registered format of `net`'s class (nearest in its MRO), or the default."""
    cls = net if isinstance(net, type) else type(net)
    return next((_FORMATS[c] for c in cls.__mro__ if c in _FORMATS), DEFAULT_FORMAT)


def _family(experiment: str) -> str:
    """A preset's family for ordering suggestions: its name up to the first underscore (dit_xl_2 -> dit)."""
    return experiment.split("_", 1)[0]


def official_state_dict(obj: Mapping[str, Any], what: str, fmt: OfficialFormat = DEFAULT_FORMAT
                        ) -> tuple[StateDict, str]:
    """The weights to load from a read file, and which part they came from (EMA whenever present)."""
    ema_entry = next((e for e in fmt.ema_entries if isinstance(obj.get(e), Mapping)), None)
    raw_entry = next((e for e in fmt.raw_entries if isinstance(obj.get(e), Mapping)), None)
    if _is_state_dict(obj):
        state, source = dict(obj), "raw state dict"
    elif _is_visgen(obj):
        state = _visgen_weights(obj, obj["visgen"].get("ema_prefix", "ema."), what)
        source = "visgen checkpoint, EMA weights"
    elif ema_entry is not None:
        state, source = dict(obj[ema_entry]), f"training-script checkpoint, its {ema_entry!r} weights"
    elif raw_entry is not None:
        state = dict(obj[raw_entry])
        source = f"training-script checkpoint without {'/'.join(fmt.ema_entries)!r}: its raw {raw_entry!r} weights"
        log.warning("%s has no %s entry: loading its raw %r weights", what, "/".join(fmt.ema_entries), raw_entry)
    else:
        entries = "/".join(fmt.ema_entries + fmt.raw_entries)
        raise ValueError(f"{what} is neither a state dict nor a checkpoint with {entries!r} weights; "
                         f"top-level keys: {sorted(map(str, obj))[:10]}")
    log.info("%s: using the %s", what, source)
    return _strip_wrapper_prefixes(state, what), source


# ----- loading -------------------------------------------------------------------------------------
def load_strict(net: nn.Module, state: Mapping[str, Tensor], what: str, experiment: str | None = None) -> None:
    """Load `state` into `net`: keys and shapes checked first, then `strict=True` (assign on meta nets).

    Floating tensors are cast to the net's dtype; the nets' `requires_grad` flags (frozen pos_embed,
    a frozen EMA) are kept as they were before loading.
    """
    net_state = net.state_dict()
    net_layout, file_layout = _layout(net_state), _layout(state)
    if file_layout != net_layout:
        target = f"experiment={experiment}" if experiment else f"the {type(net).__name__} net"
        raise _mismatch_error(what, target, file_layout, net_layout, experiment)
    cast = {}
    for k, v in state.items():
        dtype = net_state[k].dtype
        cast[k] = v.to(dtype) if v.is_floating_point() and dtype.is_floating_point and v.dtype != dtype else v
    if any(v.dtype != cast[k].dtype for k, v in state.items()):
        log.info("%s: cast %s tensors to the net's dtype", what, sorted({str(v.dtype) for v in state.values()}))
    flags = {name: p.requires_grad for name, p in net.named_parameters()}
    on_meta = any(t.is_meta for t in itertools.chain(net.parameters(), net.buffers()))
    net.load_state_dict(cast, strict=True, assign=on_meta)
    for name, p in net.named_parameters():
        p.requires_grad_(flags[name])  # assign=True swaps the Parameter objects in
    left = [n for n, t in itertools.chain(net.named_parameters(), net.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{what}: {left[:MAX_NAMED_KEYS]} stayed on the meta device (not in the state dict); "
                           "the family's key map must rebuild them after loading")


def load_official(experiment: str, path: str | Path, map_location: str | torch.device = "cpu",
                  overrides: Sequence[str] = ()) -> nn.Module:
    """The net of preset `experiment` holding the weights of `path` (an official release, training-script
    checkpoint, visgen checkpoint or safetensors file), loaded strictly; returned in eval mode."""
    path = Path(path)
    net = _build_on_meta(compose_experiment(experiment, overrides))
    fmt = official_format(net)
    state, source = official_state_dict(read_checkpoint(path, map_location), str(path), fmt)
    load_strict(net, fmt.key_map(state), str(path), experiment)
    log.info("loaded %s (%s) into experiment=%s: %s parameters", path, source, experiment,
             f"{sum(p.numel() for p in net.parameters()):,}")
    return net.eval()


def init_net_from(net: nn.Module, ema: nn.Module | None, path: str | Path, experiment: str | None = None) -> str:
    """Overwrite `net` (and `ema`) with the weights of `path`, strictly, to start a new run from them.

    A visgen `.ckpt` gives `net.` to the net and `ema.` to the EMA. An official training-script
    checkpoint gives 'model' to the net and 'ema' to the EMA; a raw state dict (a release, a
    safetensors file) gives its weights to both, as DiT starts its EMA from a copy. Returns a one-line
    description of what was loaded, for the run's log.
    """
    path = Path(path)
    obj = read_checkpoint(path)
    what = str(path)
    fmt = official_format(net)
    ema_entry = next((e for e in fmt.ema_entries if isinstance(obj.get(e), Mapping)), None)
    raw_entry = next((e for e in fmt.raw_entries if isinstance(obj.get(e), Mapping)), None)
    if _is_visgen(obj):
        net_state = _strip_wrapper_prefixes(_visgen_weights(obj, "net.", what), what)
        ema_prefix = obj["visgen"].get("ema_prefix", "ema.")
        has_ema = any(k.startswith(ema_prefix) for k in obj["state_dict"])
        ema_state = _strip_wrapper_prefixes(_visgen_weights(obj, ema_prefix, what), what) if has_ema else net_state
        others = sorted({k.split(".")[0] for k in obj["state_dict"]} - {"net", ema_prefix.rstrip(".")})
        if others:
            log.info("%s: not loading the checkpoint's %s weights (only net and EMA start a run)", what, others)
        source = "visgen checkpoint: net <- 'net.', EMA <- " + ("'ema.'" if has_ema else "'net.' (it has no EMA)")
    elif not _is_state_dict(obj) and raw_entry is not None and ema_entry is not None:
        net_state = _strip_wrapper_prefixes(dict(obj[raw_entry]), what)
        ema_state = _strip_wrapper_prefixes(dict(obj[ema_entry]), what)
        source = f"training-script checkpoint: net <- {raw_entry!r}, EMA <- {ema_entry!r}"
    else:
        net_state, part = official_state_dict(obj, what, fmt)
        ema_state = net_state
        source = f"{part}: net and EMA <- the same weights"
    load_strict(net, fmt.key_map(net_state), f"{what} (net weights)", experiment)
    if ema is not None:
        if ema_state is net_state and any(t.is_meta for t in ema.parameters()):
            ema_state = {k: v.clone() for k, v in net_state.items()}  # assign must not alias the net's tensors
        load_strict(ema, fmt.key_map(ema_state), f"{what} (EMA weights)", experiment)
    log.info("init_from %s (%s)", path, source)
    return f"{path} ({source})"
