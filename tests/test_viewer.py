"""The attnmap HTML viewer in a real headless Chromium (Debian's `chromium`, driven by Playwright).

CI needs: `apt-get install -y chromium` and `pip install playwright` (no `playwright install`: the system
browser is used). Without either, these tests are skipped with the reason.
"""

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from tiny_models import tiny_model, tiny_tokenizer

import llmdrop.analysis.attnmaps as am
from llmdrop.source.arch import adapter_for

sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package: pip install playwright")
CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "") if p and Path(p).exists()), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium: apt-get install -y chromium")

CANVAS = "document.getElementById('grid')"


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


def open_viewer(browser, path: Path):
    """A page with the viewer loaded and drawn; every request the page makes is recorded."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    requests, errors = [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-ready='1']", timeout=20_000)
    return page, requests, errors


def drawn(page) -> str:
    return page.evaluate(f"{CANVAS}.toDataURL()")


def canvas_state(page) -> dict:
    return page.evaluate(f"Object.assign({{}}, {CANVAS}.dataset)")


@pytest.fixture(scope="module")
def tiny_html(tmp_path_factory):
    model = tiny_model("llama", num_layers=4)
    from llmdrop.planning.surgery import drop_sublayers

    drop_sublayers(model, adapter_for(model.config), attn=[2])  # one row must show as dropped
    model.generation_config.eos_token_id = model.config.eos_token_id = None
    tok = tiny_tokenizer()
    tok.eos_token = None
    cap = am.capture(
        model,
        adapter_for(model.config),
        tok,
        am.encode_prompt(tok, " ".join(f"w{i}" for i in range(20))),
        max_new_tokens=5,
        progress=False,
    )
    texts = am.token_texts(tok, cap.token_ids + cap.lens_ids.ravel().tolist())
    path = tmp_path_factory.mktemp("viewer") / "attnmap.html"
    path.write_text(
        am.render_html(
            am.viewer_payload(cap, texts, model="tiny", prompt="p", chat=False, window=8, stride=5, heads="max")
        )
    )
    return path, cap, texts


def test_viewer_draws_steps_and_layers_offline(browser, tiny_html):
    path, cap, texts = tiny_html
    page, requests, errors = open_viewer(browser, path)
    assert canvas_state(page) == {"step": "4", "layer": "all", "heads": "max", "start": str(24 - 8), "width": "8"}
    before = drawn(page)
    # move the real step slider: the drawing and the status follow
    page.locator("#step").fill("1")
    assert canvas_state(page)["step"] == "1" and canvas_state(page)["start"] == str(21 - 8)
    after_step = drawn(page)
    assert after_step != before
    status = page.locator("#status").text_content()
    assert f'query = position 20 "{texts[cap.token_ids[20]]}"' in status
    assert f'predicts "{texts[cap.token_ids[21]]}"' in status
    # choose a layer in the real select: one row per head + max + mean under the lens row
    page.select_option("#layer", "1")
    assert canvas_state(page)["layer"] == "1" and drawn(page) != after_step
    assert page.locator("#layer option[value='2']").text_content() == "layer 2 (attn dropped)"
    # other heads change the all-layers picture
    page.select_option("#layer", "all")
    assert drawn(page) == after_step
    page.select_option("#head", "3")
    assert canvas_state(page)["heads"] == "3" and drawn(page) != after_step
    # hovering a cell shows that layer's logit-lens top-5 with probabilities, as captured
    box = page.locator("#grid").bounding_box()
    col, row = 2, 1  # position start + 2, layer 1
    page.mouse.move(box["x"] + 130 + col * 58 + 20, box["y"] + 44 + row * 20 + 8)
    tip = page.locator("#tip").text_content()
    p = 13 + col
    assert tip.startswith(f'position {p} "{texts[cap.token_ids[p]]}"') and "logit lens, layer 1" in tip
    lines = [line.split("%") for line in tip.splitlines() if "%" in line]
    assert len(lines) == 5
    for (prob, tok), i, pr in zip(lines, cap.lens_ids[p, 1], cap.lens_probs[p, 1]):
        assert float(prob) == pytest.approx(100 * pr, abs=0.051) and json.loads(tok.strip()) == texts[int(i)]
    assert errors == []
    assert requests == [path.as_uri()]  # nothing but the file itself: no CDN, fonts, or fetches
    page.close()


def synthetic_capture(L=30, H=9, n_prompt=50, steps=250, k=5, seed=0):
    """The size the issue asks to stay responsive at: 30 layers x 9 heads x 300 tokens (attention: a sink at
    position 0, some recency, noise)."""
    rng = np.random.default_rng(seed)
    attn = []
    for i in range(steps):
        x = rng.standard_normal((L, H, n_prompt + i)).astype(np.float32) * 1.5
        x[..., 0] += 5
        x[..., -3:] += 2
        x = np.exp(x - x.max(-1, keepdims=True))
        attn.append(x / x.sum(-1, keepdims=True))
    positions = n_prompt + steps - 1
    ids = rng.integers(0, 1000, (positions, L + 1, k))
    probs = np.sort(rng.random((positions, L + 1, k)).astype(np.float32), -1)[..., ::-1] / k
    return am.AttnCapture(
        rng.integers(0, 1000, positions + 1).tolist(), n_prompt, L, H, [], attn, ids, np.ascontiguousarray(probs)
    )


def test_viewer_stays_responsive_at_30_layers_9_heads_300_tokens(browser, tmp_path):
    cap = synthetic_capture()
    texts = {i: f"tok{i}" for i in range(1000)}
    path = tmp_path / "big.html"
    path.write_text(
        am.render_html(
            am.viewer_payload(cap, texts, model="synthetic", prompt="p", chat=False, window=32, stride=5, heads="max")
        )
    )
    size_mb = path.stat().st_size / 2**20
    assert size_mb < 8, f"{size_mb:.1f} MiB"  # ~4.5 MiB: 11.8 M attention bytes, zlib-compressed, base64
    t0 = time.perf_counter()
    page, requests, errors = open_viewer(browser, path)
    load_s = time.perf_counter() - t0
    # a slider move redraws 31 rows x 32 columns and the 300-token strip
    ms = page.evaluate("""() => {
        const el = document.getElementById('step'), t = [];
        for (const v of [10, 200, 120, 249, 3, 180]) {
            const t0 = performance.now();
            el.value = v; el.dispatchEvent(new Event('input'));
            t.push(performance.now() - t0);
        }
        return Math.max(...t);
    }""")
    assert canvas_state(page)["step"] == "180"
    page.select_option("#layer", "29")
    assert canvas_state(page)["layer"] == "29"
    assert errors == [] and requests == [path.as_uri()]
    assert ms < 250, f"slowest redraw {ms:.0f} ms"
    assert load_s < 20, f"load {load_s:.1f} s"
    page.close()
