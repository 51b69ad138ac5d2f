"""Train a model: python train.py model=resnet56 norm=mbn [data=cifar100] [experiment=smoke]"""
import sys

import hydra
from hydra.core.hydra_config import HydraConfig

from mbn import UserError
from mbn.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg):
    from mbn.engine import fit  # after Hydra has parsed the command line: fast --help

    hc = HydraConfig.get()
    try:
        return fit(cfg, hc.runtime.output_dir, hc.overrides.task).get("test_err")  # for sweepers
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
