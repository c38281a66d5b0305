"""Zeroth-order estimates (SPSA / MeZO): finite differences on the forward gradient's tangents."""
