"""Blind ranking studies of a sweep's outputs (CTEG §4.5, Figure 4): ``facelab study create | serve | report``.

* :mod:`facelab.study.core` -- create a study (sample test texts, generate one output per method),
  present it blind (per-rater shuffles, no method names), store each rater's answers;
* :mod:`facelab.study.server` -- the raters' page (a small threading HTTP server);
* :mod:`facelab.study.stats` -- preference distribution, average rank, Fleiss' kappa;
* :mod:`facelab.study.report` -- the Markdown table, the heat map, logging to the sweep's run.

``docs/study.md`` describes the protocol. Nothing here starts work at import time.
"""
