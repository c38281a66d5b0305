"""Activity perturbation (FG-A, Ren et al. 2023): the estimator and the layers it perturbs."""
