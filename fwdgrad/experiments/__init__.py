"""The experiments built on the library: training (the one loop), global optimisation, approximation quality,
run comparison, their datasets and figures. They need the ``experiments`` extra (Hydra, matplotlib, pandas, ...)."""
