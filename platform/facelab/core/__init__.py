"""The bottom layer: checkpoint format, distributed helpers, config base, layers, text encoders,
tracking and DVC lineage. Imports nothing above it."""
