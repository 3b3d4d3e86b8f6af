"""Evaluate a checkpoint: `python evaluate.py ckpt=<run dir>/checkpoints/last.ckpt num_samples=1000`."""

import sys

import hydra
from omegaconf import DictConfig

from visgen.errors import report_user_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@report_user_errors  # a UserError (typo, occupied dir, missing file) is one line, not a traceback
def main(cfg: DictConfig) -> dict:
    from visgen.eval.evaluate import evaluate  # imported inside: `--help` stays fast

    return evaluate(cfg)  # returned for Hydra callbacks: a sweep collects every job's numbers


def _rewrite(arg: str) -> str:
    # Without a `sampling=<group>` choice the config has no `sampling` node (the sampler lives in the
    # checkpoint), so Hydra would refuse `sampling.cfg_scale=2`; its add-or-override form `++` works
    # with or without a group, and visgen.eval.evaluate.sampling_config applies the patch.
    if arg.startswith("sampling."):
        return f"++{arg}"
    # `experiment` is a config group of train.py, which Hydra would try to load here: the preset's name goes
    # into evaluate.yaml's `preset` key instead (official files: experiment=dit_xl_2 ckpt=DiT-XL-2-256x256.pt).
    if arg.startswith("experiment="):
        return f"preset={arg.removeprefix('experiment=')}"
    return arg


if __name__ == "__main__":
    sys.argv = [_rewrite(arg) for arg in sys.argv]
    main()
