"""See the faces: a schematic face that moves for every one of the 61 ARKit channels, and self-contained
HTML pages of a run's outputs.

* :mod:`facelab.viewer.rig_table` -- the face rig as data (which control points each channel moves);
* :mod:`facelab.viewer.rig` -- that rig evaluated and drawn as SVG or on a matplotlib axis (the PNG
  previews of :mod:`facelab.plots` use it);
* ``face.js`` / ``viewer.css`` -- the same drawing rules in the browser, with per-channel bars, an
  expression heatmap and curves;
* :mod:`facelab.viewer.html` -- one HTML file (data, script and style inlined; no network) per run
  (keyframes or expressions, ground truth beside generated), per sweep (one row per variant), and
  the served model's page (a form that asks the same server and draws the answer).

``docs/viewer.md`` describes the rig and the pages.

Nothing here starts work at import time; matplotlib is imported only by :func:`rig.draw_face`.
"""
