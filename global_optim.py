"""Minimise a test function with forward gradients beside backprop (Baydin et al. 2022, Sec. 5.1).

    python global_optim.py                                    # Beale, forward gradient and backprop
    python global_optim.py function=rosenbrock
    python global_optim.py function=rosenbrock function.dim=100 gradient.num_tangents=16
    python global_optim.py -m seed=0,1,2,3,4 function=beale,rosenbrock
    python global_optim.py +experiment=reference_beale        # the reference implementation's run

Config: configs/global_optim.yaml. Outputs (TensorBoard scalars, summary.json, loss.png, trajectories.png)
go to the Hydra run directory under outputs/global_optim/.
"""

from fwdgrad.app.process import prepare_process

prepare_process()  # first: the experiments extra, then opt-in process settings (before torch loads)

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from fwdgrad.app.cli import hydra_task, run_hydra  # noqa: E402
from fwdgrad.experiments.global_optim.optimize import run  # noqa: E402


@hydra.main(version_base="1.3", config_path="configs", config_name="global_optim")
@hydra_task
def main(cfg: DictConfig) -> dict:
    return run(cfg)


if __name__ == "__main__":
    run_hydra(main)
