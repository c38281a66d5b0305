"""Tangents: distributions and their chunked draw, custom joint tangents, seeded regeneration, the RNG."""
