"""Train a visgen experiment: `python train.py experiment=demo_sit [key=value ...]`."""

import hydra
from omegaconf import DictConfig

from visgen.errors import report_user_errors  # also registers the sweep-folder resolvers (conf/hydra/default.yaml)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@report_user_errors  # a UserError (typo, occupied dir, missing file) is one line, not a traceback
def main(cfg: DictConfig) -> None:
    from visgen.training.train import train  # imported inside: `--help` and `--cfg` stay fast

    train(cfg)


if __name__ == "__main__":
    main()
