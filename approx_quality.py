"""Forward-gradient approximation quality: cosine similarity and norm ratio against k.

    python approx_quality.py                          # Gaussian gradients, n = 100, 1000, 10000
    python approx_quality.py num_samples=50 'source.dims=[1000]' 'distributions=[normal]'

Writes approx_quality.csv, cosine_vs_k.png and norm_ratio_vs_k.png into the Hydra run directory
(outputs/approx_quality/<timestamp>/). See fwdgrad/experiments/quality/analysis.py for the maths.
"""

from fwdgrad.app.process import prepare_process

prepare_process()  # first: the experiments extra, then opt-in process settings (before torch loads)

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from fwdgrad.app.cli import hydra_task, run_hydra  # noqa: E402
from fwdgrad.experiments.quality.analysis import run_approx_quality  # noqa: E402


@hydra.main(version_base="1.3", config_path="configs", config_name="approx_quality")
@hydra_task
def main(cfg: DictConfig) -> dict:
    return run_approx_quality(cfg)


if __name__ == "__main__":
    run_hydra(main)
