"""Evaluate a checkpoint: `python evaluate.py ckpt=<run dir>/checkpoints/last.ckpt num_samples=1000`."""

import sys

import hydra
from omegaconf import DictConfig

from visgen.errors import report_user_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@report_user_errors  # a UserError (typo, occupied dir, missing file) is one line, not a traceback
def main(cfg: DictConfig) -> None:
    from visgen.eval.evaluate import evaluate  # imported inside: `--help` stays fast

    evaluate(cfg)


if __name__ == "__main__":
    # Without a `sampling=<group>` choice the config has no `sampling` node (the sampler lives in the
    # checkpoint), so Hydra would refuse `sampling.cfg_scale=2`; its add-or-override form `++` works
    # with or without a group, and visgen.eval.evaluate.sampling_config applies the patch.
    sys.argv = [f"++{arg}" if arg.startswith("sampling.") else arg for arg in sys.argv]
    main()
