"""Side-by-side comparison of training runs (``compare.py``)."""
