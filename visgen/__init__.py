"""visgen: class-conditional image generators (SiT, DiT, ...) in one Lightning + Hydra codebase.

`import visgen` stays light: `load_official` and `init_net_from` import their module (torch, Hydra)
on first use, and nothing here imports Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from visgen.official import init_net_from, load_official

__all__ = ["load_official", "init_net_from"]


def __getattr__(name: str) -> Any:
    """Import the official-weights loader lazily (PEP 562)."""
    if name in __all__:
        from visgen import official

        return getattr(official, name)
    raise AttributeError(f"module 'visgen' has no attribute {name!r}")
