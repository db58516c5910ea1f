"""The worker runtime (:mod:`facelab.runtime.worker`) and the sweep driver (:mod:`facelab.runtime.sweep`)."""
