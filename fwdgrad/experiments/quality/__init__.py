"""Approximation quality: how close estimates come to the true gradient (``approx_quality.py``)."""
