"""Minimise a test function with forward gradients beside backprop (Baydin et al. 2022, Sec. 5.1).

    python global_optim.py                                    # Beale, forward gradient and backprop
    python global_optim.py function=rosenbrock
    python global_optim.py function=rosenbrock function.dim=100 gradient.num_tangents=16
    python global_optim.py -m seed=0,1,2,3,4 function=beale,rosenbrock

Config: configs/global_optim.yaml. Outputs (TensorBoard scalars, summary.json, loss.png, trajectories.png)
go to the Hydra run directory under outputs/global_optim/.
"""

import logging
import sys

import hydra
from omegaconf import DictConfig

from fwdgrad.errors import ConfigError
from fwdgrad.optimize import run_global_optim

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="configs", config_name="global_optim")
def main(cfg: DictConfig) -> None:
    try:
        run_global_optim(cfg)
    except ConfigError as err:  # a user error: one paragraph, no traceback, exit status 2
        log.error("%s", err)
        sys.exit(2)


if __name__ == "__main__":
    main()
