"""Convert an official (or visgen) checkpoint into a visgen net's weights as one safetensors file.

    python -m visgen.convert --experiment dit_xl_2 --src DiT-XL-2-256x256.pt --out dit_xl_2.safetensors

The source is loaded exactly as `visgen.load_official` loads it (strict: every key used, shapes
checked), so a written file always fits the preset; it loads back with
`load_official(<experiment>, <out>)` or starts a run with `model.init_from=<out>`. Safetensors holds
no pickled code and memory-maps on load.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["convert", "main"]

log = logging.getLogger(__name__)


def convert(experiment: str, src: str | Path, out: str | Path, overwrite: bool = False,
            overrides: Sequence[str] = ()) -> int:
    """Write the net of `experiment` loaded from `src` to `out` (safetensors); return its parameter count."""
    from safetensors.torch import save_file

    from visgen.official import load_official

    src, out = Path(src), Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out} must end in .safetensors")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if out.resolve() == src.resolve():
        raise ValueError(f"--out {out} is the source file itself; write to another path")
    net = load_official(experiment, src, overrides=overrides)
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    metadata = {"visgen_experiment": experiment, "source": src.name, "overrides": " ".join(overrides)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(out)  # a crash mid-write leaves no truncated file under the final name
    return sum(p.numel() for p in net.parameters())


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m visgen.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", required=True, help="preset whose net receives the weights, e.g. dit_xl_2")
    parser.add_argument("--src", required=True, help="official .pt/.pth, training-script checkpoint, visgen .ckpt "
                        "or .safetensors")
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="Hydra override applied to the preset (repeatable), e.g. data.num_classes=10")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        n_params = convert(args.experiment, args.src, args.out, args.overwrite, args.override)
    except (FileExistsError, FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: experiment={args.experiment}, {n_params:,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
