"""Model families: one folder each, plus the :class:`~facelab.families.base.Family` contract and the
registry (:mod:`facelab.families.registry`) through which the platform finds them."""
