"""Global optimisation of test functions with forward gradients beside backprop (``global_optim.py``)."""
