"""report.html in a real browser: headless Chromium driven by Playwright.

Every figure renders (non-zero box, decoded image), no console message of type error or
warning, no page error, and no request but the page's own file: a hostile SVG figure (a
script, an external image) must neither run nor load anything.

Needs the ``playwright`` package and a Chromium binary (Playwright cannot download its own
here): ``apt-get install chromium`` (Debian/Ubuntu) or set ``RARETOKEN_CHROMIUM`` to a
Chromium/Chrome executable. Skipped with the reason when either is missing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline_fixtures import tiny_overrides, tiny_setup
from raretoken.report import write_run_report, write_sweep_report
from raretoken.run import identify, make_config
from test_report import write_addons, write_run_dir, write_sweep_dir


def _chromium() -> tuple[str | None, str]:
    """The browser's path, or ``None`` and why not. ``RARETOKEN_CHROMIUM``, when set, is the
    only candidate."""
    env = os.environ.get("RARETOKEN_CHROMIUM")
    if env:
        ok = Path(env).is_file() and os.access(env, os.X_OK)
        return (env, "") if ok else (None, f"RARETOKEN_CHROMIUM={env} is not an executable")
    for candidate in (
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
        shutil.which("google-chrome"),
        "/usr/bin/chromium",
    ):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate, ""
    return None, (
        "no Chromium: apt-get install chromium (or set RARETOKEN_CHROMIUM to a "
        "Chromium/Chrome executable)"
    )


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="no playwright: pip install playwright"
    )
    exe, why = _chromium()
    if exe is None:
        pytest.skip(why)
    with sync_api.sync_playwright() as pw:
        # --no-sandbox: Chromium refuses to start as root (containers, CI) with its sandbox
        b = pw.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        yield b
        b.close()


def open_report(browser: Any, path: Path) -> dict[str, Any]:
    """Load ``path`` and return what the browser saw: figures, console, requests."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    console: list[str] = []
    errors: list[str] = []
    requests: list[str] = []
    failed: list[str] = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    page.on("requestfailed", lambda r: failed.append(r.url[:120]))
    page.goto(path.resolve().as_uri(), wait_until="load")
    # wait until every image has decoded (or failed)
    page.wait_for_function("Array.from(document.images).every(i => i.complete)")
    figures = page.eval_on_selector_all(
        "img",
        """els => els.map(e => { const r = e.getBoundingClientRect();
            return {stem: e.dataset.figure, natural: e.naturalWidth, w: r.width, h: r.height}; })""",
    )
    toc = page.eval_on_selector_all(
        "nav.toc a",
        "els => els.map(a => !!document.getElementById(a.getAttribute('href').slice(1)))",
    )
    banner = page.locator("#status-banner")
    seen = {
        "figures": figures, "console": console, "errors": errors, "toc": toc,
        "requests": [u for u in requests if not u.startswith("data:")], "failed": failed,
        "banner": banner.inner_text() if banner.count() else None,
    }  # fmt: skip
    page.close()
    return seen


def assert_renders(seen: dict[str, Any], path: Path, stems: set[str]) -> None:
    assert sorted(f["stem"] for f in seen["figures"]) == sorted(stems)
    for f in seen["figures"]:
        assert f["natural"] > 0 and f["w"] > 0 and f["h"] > 0, f
    bad = [c for c in seen["console"] if c.split(":")[0] in ("error", "warning")]
    assert bad == [] and seen["errors"] == [] and seen["failed"] == []
    assert seen["requests"] == [path.resolve().as_uri()]
    assert seen["toc"] and all(seen["toc"])


def _stems(fig_dir: Path, *, skip: tuple[str, ...] = ()) -> set[str]:
    return {p.stem for p in fig_dir.iterdir() if p.suffix in (".svg", ".png")} - set(skip)


def test_run_report_renders(browser: Any, tmp_path: Path) -> None:
    run = write_run_dir(tmp_path / "run")
    path = write_run_report(run)
    seen = open_report(browser, path)
    assert_renders(seen, path, _stems(run / "figures"))
    assert seen["banner"] is None


def test_run_report_with_layers_and_interventions_renders(browser: Any, tmp_path: Path) -> None:
    run = write_addons(write_run_dir(tmp_path / "run"))
    path = write_run_report(run)
    seen = open_report(browser, path)
    assert_renders(seen, path, _stems(run / "figures") | {"interventions"})


def test_failed_run_report_renders_with_banner(browser: Any, tmp_path: Path) -> None:
    err = {"stage": "ablation", "type": "NumericalError", "message": "NaN in Δloss"}
    run = write_run_dir(tmp_path / "run", status="failed", error=err)
    path = write_run_report(run)
    seen = open_report(browser, path)
    assert_renders(seen, path, _stems(run / "figures"))
    assert "incomplete" in seen["banner"] and "NumericalError: NaN in Δloss" in seen["banner"]


def test_real_identified_run_renders(browser: Any, tmp_path: Path) -> None:
    """matplotlib's own run figures (rank curve, token frequency, covariates), no analyses."""
    model_dir, corpus = tiny_setup(tmp_path)
    cfg = make_config(overrides=tiny_overrides(model_dir, corpus))
    ident = identify(cfg, tmp_path / "run", cache_dir=tmp_path / "cache", progress=False)
    path = write_run_report(ident.run_dir)
    seen = open_report(browser, path)
    stems = _stems(ident.run_dir / "figures")
    assert {"rank_curve", "token_frequency"} <= stems
    assert_renders(seen, path, stems)
    assert "Identification only" in seen["banner"]


def test_sweep_report_renders(browser: Any, tmp_path: Path) -> None:
    sweep = write_sweep_dir(tmp_path / "sweep")
    path = write_sweep_report(sweep, run_reports=True)
    seen = open_report(browser, path)
    assert_renders(seen, path, _stems(sweep / "figures"))
    assert "1 of 3 task(s) failed" in seen["banner"]
    # the task's own page, reached through the sweep page's link, renders too
    run_page = sweep / "tasks/ok/run/report.html"
    assert_renders(open_report(browser, run_page), run_page, _stems(run_page.parent / "figures"))
