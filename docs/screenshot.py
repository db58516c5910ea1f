"""Write the README's picture of the viewer (docs/img/viewer_keyframes.png): a keyframe run page
(``facelab.viewer.html``) with two hand-set faces -- ground truth beside a generated one and the 61
channel bars -- opened in headless Chromium from disk.

    PYTHONPATH=platform python docs/screenshot.py [--chromium PATH]

Needs Playwright (the dev extra) and a system Chromium (Debian's ``chromium``)."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

from facelab.data.arkit import CHANNELS, HIGH, INDEX, LOW
from facelab.viewer import html

OUT = Path(__file__).resolve().parent / "img" / "viewer_keyframes.png"

FACES = {
    "narrows the eyes and sneers, furious": {"NoseSneerLeft": 0.75, "NoseSneerRight": 0.69, "MouthUpperUpLeft": 0.38,
        "MouthUpperUpRight": 0.38, "CheekSquintLeft": 0.31, "CheekSquintRight": 0.31, "BrowDownLeft": 0.6,
        "BrowDownRight": 0.6, "EyeSquintLeft": 0.5, "EyeSquintRight": 0.5},
    "laughs with the head tipped back": {"MouthSmileLeft": 0.9, "MouthSmileRight": 0.85, "JawOpen": 0.55,
        "CheekSquintLeft": 0.5, "CheekSquintRight": 0.5, "EyeSquintLeft": 0.4, "EyeSquintRight": 0.4,
        "BrowInnerUp": 0.3, "HeadPitch": -0.2, "HeadRoll": 0.15},
}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    rng = np.random.default_rng(0)
    gt = np.zeros((len(FACES), len(CHANNELS)), dtype=np.float32)
    for i, values in enumerate(FACES.values()):
        for name, v in values.items():
            gt[i, INDEX[name]] = v
    pred = np.clip(gt + rng.normal(0, 0.06, gt.shape) * (gt > 0), LOW, HIGH).astype(np.float32)
    payload = html.keyframe_payload(gt, pred, list(FACES), title="facelab viewer: a keyframe run",
                                    subtitle="ground truth beside the generated keyframe; 61 ARKit channels")  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        page_path = html.write_page(payload, Path(d) / "preview.html")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, headless=True)
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.goto(page_path.as_uri())
            page.wait_for_selector("#facelab-root[data-ready='1']", timeout=10_000)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), clip={"x": 0, "y": 0, "width": 1100, "height": 760})
            browser.close()
    print(args.out)


if __name__ == "__main__":
    main()
