"""facelab — a Ray-orchestrated experiment platform for text-to-facial-expression research."""

__version__ = "0.1.0"
