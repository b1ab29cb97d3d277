"""Screenshot of an `llmdrop attnmap` viewer in headless Chromium (the README's picture).

    python scripts/attnmap_screenshot.py attn-smollm2/attnmap.html docs/img/attnmap-viewer.png --step 0 \
        --hover-pos 34 --hover-layer 24

Needs Debian's chromium (`apt-get install -y chromium`) and `pip install playwright`.
"""

import argparse
from pathlib import Path

from playwright.sync_api import sync_playwright

CW, CH, LEFT, TOP = 58, 20, 130, 44  # the viewer's cell geometry (llmdrop/data/attnmap_viewer.html)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html")
    ap.add_argument("png")
    ap.add_argument("--step", type=int, default=0)
    ap.add_argument("--hover-pos", type=int, help="key position to hover (must be in the shown window)")
    ap.add_argument("--hover-layer", type=int, default=0)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 2050, "height": 860})
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(Path(args.html).resolve().as_uri())
        page.wait_for_selector("body[data-ready='1']")
        page.locator("#step").fill(str(args.step))
        if args.hover_pos is not None:
            start = int(page.evaluate("document.getElementById('grid').dataset.start"))
            box = page.locator("#grid").bounding_box()
            page.mouse.move(
                box["x"] + LEFT + (args.hover_pos - start) * CW + CW / 2,
                box["y"] + TOP + args.hover_layer * CH + CH / 2,
            )
        page.screenshot(path=args.png, full_page=True)
        browser.close()
    assert len(requests) == 1, requests  # the file itself, nothing else
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
