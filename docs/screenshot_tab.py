"""Screenshot of the graddiag tab in a live TensorBoard, taken with headless Chromium.

    make demo   # writes graddiag_logs/
    .venv/bin/python docs/screenshot_tab.py --logdir graddiag_logs --out docs/graddiag_tab.png
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.browser import FRAME_DOC, FRAME_READY, Chromium, find_chromium, tensorboard_server  # noqa: E402
from tests.tb_entry_point import entry_point_path  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", type=Path, default=ROOT / "graddiag_logs")
    parser.add_argument("--run", help="run to show (default: the tab's own choice)")
    parser.add_argument("--finding", type=int, help="index of the finding to click")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "graddiag_tab.png")
    parser.add_argument("--width", type=int, default=1440)
    parser.add_argument("--height", type=int, default=1000)
    args = parser.parse_args(argv)
    binary = find_chromium()
    if binary is None:
        parser.error("needs headless Chromium (Debian: apt-get install -y chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        extra = entry_point_path(Path(tmp) / "entry_points")
        runs = {args.run} if args.run else set()
        with tensorboard_server(args.logdir, extra, runs) as url:
            chrome = Chromium(binary, Path(tmp) / "profile", args.width, args.height)
            try:
                chrome.navigate(url + "/#graddiag")
                doc = FRAME_DOC
                chrome.wait_for(FRAME_READY, 90)
                if args.run:
                    chrome.evaluate(f"(() => {{ const s = {doc}.getElementById('graddiag-run');"
                                    f"s.value = {args.run!r}; s.dispatchEvent(new Event('change'));"
                                    "})()")
                    chrome.wait_for(f"{doc}.body.dataset.run === {args.run!r}")
                if args.finding is not None:
                    chrome.evaluate(f"{doc}.querySelector('.finding[data-index=\"{args.finding}\"]')"
                                    ".click()")
                chrome.drain(1.0)
                chrome.screenshot(args.out)
            finally:
                chrome.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
