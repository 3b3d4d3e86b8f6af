"""Evaluate a checkpoint: `python evaluate.py ckpt=<run dir>/checkpoints/last.ckpt num_samples=1000`."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from visgen.eval.evaluate import evaluate  # imported inside: `--help` stays fast

    evaluate(cfg)


if __name__ == "__main__":
    main()
