"""Train a classifier on MNIST-like data with the gradient estimator chosen by this script's config.

    python mnist_fwdgrad.py  [overrides]    forward gradients (configs/mnist_fwdgrad.yaml)
    python mnist_backprop.py [overrides]    backprop          (configs/mnist_backprop.yaml)

e.g. model=conv dataset=fashion_mnist optimization=adam gradient.num_tangents=16, or +experiment=reference_mnist.
All the work is in fwdgrad.experiments.training; the two scripts differ only in config_name.
"""

from fwdgrad.app.process import prepare_process

prepare_process()  # first: the experiments extra, then opt-in process settings (before torch loads)

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from fwdgrad.app.cli import hydra_task, run_hydra  # noqa: E402
from fwdgrad.experiments.training import run  # noqa: E402


@hydra.main(version_base="1.3", config_path="configs", config_name="mnist_fwdgrad")
@hydra_task
def main(cfg: DictConfig) -> dict:
    return run(cfg)


if __name__ == "__main__":
    run_hydra(main)
