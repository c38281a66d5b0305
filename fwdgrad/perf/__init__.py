"""Process-level performance tools, all opt-in: peak-memory measurement, malloc and OpenMP settings."""
