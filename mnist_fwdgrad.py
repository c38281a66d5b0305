"""Placeholder: filled by its issue."""
raise SystemExit("mnist_fwdgrad.py is not implemented yet")
