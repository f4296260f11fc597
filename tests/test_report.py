"""HTML reports (raretoken.report): run and sweep pages, Markdown subset, escaping, banners.

The builders ``write_run_dir`` / ``write_sweep_dir`` (synthetic directories with hostile
strings and real matplotlib SVGs) are shared with tests/test_report_browser.py.
"""

from __future__ import annotations

import ast
import base64
import csv
import html
import json
import re
import socket
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline_fixtures import tiny_overrides, tiny_setup
from raretoken.errors import RunDirectoryError
from raretoken.report import markdown_to_html, write_run_report, write_sweep_report
from raretoken.report.figures import collect_figures
from raretoken.report.tables import format_number
from raretoken.run import AnalysisOptions, analyze, identify, make_config

HOSTILE = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
SRC = Path(__file__).resolve().parents[1] / "src" / "raretoken"


# ---------------------------------------------------------------- builders (shared)
def save_figure(path: Path, title: str, **kw: Any) -> None:
    """A real matplotlib figure (its SVG has clip-path ids that every figure reuses)."""
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([1, 2, 3], [3, 1, 2], label=title)
    ax.set_title(title)
    ax.legend()
    fig.savefig(path, **kw)
    plt.close(fig)


def write_run_dir(root: Path, status: str = "complete", **manifest: Any) -> Path:
    """A synthetic run directory: manifest, summary, claims, analyses tables, figures."""
    run = root
    (run / "analyses").mkdir(parents=True, exist_ok=True)
    (run / "figures").mkdir(exist_ok=True)
    save_figure(run / "figures/rank_curve.svg", "rank curve")
    save_figure(run / "figures/rank_curve.png", "rank curve")
    save_figure(run / "figures/spectra.svg", "spectra")
    save_figure(run / "figures/only_png.png", "png only")
    # a hostile SVG: a script and an external image; shown through <img>, neither may run/load
    (run / "figures/hostile.svg").write_text(
        '<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" '
        'xmlns:xlink="http://www.w3.org/1999/xlink" width="120" height="60">'
        '<script>console.error("svg script ran")</script>'
        '<image href="https://example.invalid/x.png" width="10" height="10"/>'
        '<rect id="clip0" width="100" height="50" fill="#36c"/></svg>'
    )
    claims = [
        "key,claim,prediction,finding,test,p_value,p_bh,verdict,verdict_matched",
        f'coordination,Coordinated (§4.2),d_eff/N lower,"found {HOSTILE}",empirical p,0.0099,0.02,supported,',
        "spatial,Distributed (§4.3),Q not higher,Q 0.11,empirical p,0.5,0.6,not supported,supported",
        "replication,Replicates,overlap,no plateau,hypergeometric,,,inconclusive,",
    ]  # fmt: skip
    (run / "analyses/claims.csv").write_text("\n".join(claims) + "\n")
    (run / "analyses/claims.md").write_text("# claims\n")
    (run / "analyses/report.md").write_text("# all\n")
    (run / "analyses/coordination.md").write_text(
        "### Activation coordination (Table 1)\n\nEffective dimension of *16* neurons.\n\n"
        "| group | d_eff |\n|---|---|\n| top-16 | 14 |\n"
    )
    (run / "analyses/coordination.csv").write_text(
        "group,d_eff,ratio,p\ntop-16,14,0.875,0.009900990099009901\n"
    )
    (run / "analyses/tokens_table.csv").write_text(
        f'token,count,share\n"{HOSTILE}",3,1.2345678e-07\nthe,12345678,0.5\n'
    )
    summary = (
        "# raretoken: rare-token neuron identification\n\nModel `tiny`.\n\n## Tokens\n"
        f"- 1,000 tokens; a hostile token {HOSTILE}\n- rare: **600 positions**\n\n"
        "See `figures/rank_curve.png` and [the manifest](manifest.json).\n"
    )
    (run / "summary.md").write_text(summary)
    m: dict[str, Any] = {
        "schema_version": 2, "run_id": "abc123def456", "status": status,
        "created": "2026-01-01T00:00:00+00:00", "updated": "2026-01-01T00:01:00+00:00",
        "config": {"model": f"model{HOSTILE}", "corpus": "c.jsonl", "preset": "demo", "seed": 0},
        "stages": {"forward": {"seconds": 1.5, "finished": "2026-01-01T00:00:30+00:00",
                               "key": "ab" * 32}},
        "outputs": {
            "fig_rank": {"path": "figures/rank_curve.png",
                         "about": "Figure 1: log-log rank curve of Δloss (also .svg)"},
            "fig_hostile": {"path": "figures/hostile.svg", "about": f"caption {HOSTILE}"},
            "coord": {"path": "analyses/coordination.csv", "about": "Table 1: d_eff/N (CSV)"},
        },
        "versions": {"python": "3.11", "raretoken": "0.1.0"}, "git_commit": "deadbeef",
        "platform": "Linux", "command": ["raretoken", "run"], "identity": {"model": "tiny"},
        "total_seconds": 60.0, **manifest,
    }  # fmt: skip
    (run / "manifest.json").write_text(json.dumps(m))
    return run


def write_addons(run: Path) -> Path:
    """Per-layer results (``layers/``, ``figures/depth.*``) and interventions
    (``interventions/``) in the synthetic run directory ``run``, with hostile strings."""
    (run / "layers").mkdir(exist_ok=True)
    (run / "interventions").mkdir(exist_ok=True)
    save_figure(run / "figures/depth.svg", "depth")
    save_figure(run / "figures/depth.png", "depth")
    save_figure(run / "interventions/interventions.svg", "interventions")
    save_figure(run / "interventions/interventions.png", "interventions")
    (run / "layers/layers.csv").write_text(
        "layer,n_neurons,plateau_size,kappa,values\n0,64,,0.41,screen\n1,64,5,0.52,exact\n"
    )
    (run / "layers/screen_quality.csv").write_text("layer,targets,spearman\n0,rare,0.93\n")
    (run / "layers/layer_00.json").write_text("{}")
    (run / "layers/summary.md").write_text("## Rare-token neurons across depth\n\nsection\n")
    (run / "interventions/interventions.md").write_text(
        "# Interventions on plateau (5 neurons)\n\n| condition | d_rare |\n|---|---|\n"
        "| scale ×0 | 0.25 |\n\n## Greedy generations\n\n| prompt | continuation |\n"
        f"|---|---|\n| The cat | sat {HOSTILE} |\n"
    )
    (run / "interventions/interventions.csv").write_text("condition,d_rare\nscale ×0,0.25\n")
    (run / "interventions/interventions.json").write_text("{}")
    (run / "interventions/summary.md").write_text("## Interventions\n\nsection\n")
    with (run / "summary.md").open("a") as fh:
        fh.write(
            "\n## Rare-token neurons across depth\n\nFigure: `figures/depth.png`; quality: "
            "`layers/screen_quality.csv`.\n\n## Interventions on the rare-token neurons\n\n"
            "Tables: `interventions/interventions.md`; figure: "
            "`interventions/interventions.png`.\n"
        )
    m = json.loads((run / "manifest.json").read_text())
    m["outputs"]["layers:figures/depth.png"] = {
        "path": "figures/depth.png",
        "about": "plateau size and κ against layer",
    }
    m["outputs"]["interventions:interventions/interventions.png"] = {
        "path": "interventions/interventions.png",
        "about": "loss change vs scale factor",
    }
    m.setdefault("stages", {}).update(layers={"finished": "x"}, interventions={"finished": "x"})
    (run / "manifest.json").write_text(json.dumps(m))
    return run


def write_sweep_dir(root: Path, with_manifest: bool = True) -> Path:
    """A synthetic sweep: a complete task (with a run report), a failed one, a pending one."""
    sweep = root
    ok_run = write_run_dir(sweep / "tasks/ok/run")
    write_run_report(ok_run)
    (sweep / "tasks/bad").mkdir(parents=True)
    (sweep / "tasks/bad/traceback.txt").write_text(
        "Traceback (most recent call last):\n  File x\nModelLoadError: no such revision <step9>\n"
    )
    (sweep / "tasks/wait").mkdir(parents=True)
    tasks: list[dict[str, Any]] = [
        {"name": "ok", "model": "m", "revision": "step1", "status": "complete", "seconds": 3.25,
         "error": None, "run_dir": "tasks/ok/run", "traceback": None, "config": {"seed": 0}},
        {"name": "bad", "model": "m", "revision": "step9", "status": "failed", "seconds": 0.5,
         "error": {"type": "ModelLoadError", "message": f"no revision {HOSTILE}"},
         "run_dir": "tasks/bad/run", "traceback": "tasks/bad/traceback.txt", "config": {}},
        {"name": "wait", "model": "m", "revision": "step2", "status": "pending", "seconds": None,
         "error": None, "run_dir": "../../../etc", "traceback": None, "config": {}},
    ]  # fmt: skip
    if with_manifest:
        (sweep / "sweep_manifest.json").write_text(json.dumps({
            "schema_version": 1, "source": "sweep.toml", "executor": "local",
            "started": "2026-01-01T00:00:00+00:00", "updated": "2026-01-01T01:00:00+00:00",
            "settings": {"preset": "demo"}, "analysis": {"routing": False},
            "versions": {"python": "3.11"}, "tasks": tasks,
            "outputs": {"f3": {"path": "figures/figure3.svg", "about": "Figure 3: rank curves"},
                        "figures/dynamics_kappa.svg": "κ against training step"},
        }))  # fmt: skip
    else:
        for i, t in enumerate(tasks):
            (sweep / "tasks" / t["name"] / "task.json").write_text(json.dumps({**t, "index": i}))
    pq.write_table(pa.table({
        "task": ["ok", "bad", "wait"], "model": ["m", "m", "m"],
        "revision": ["step1", "step9", "step2"], "status": ["complete", "failed", "pending"],
        "zz_extra": [1.0, None, None], "kappa": [0.3256, None, None],
        "coordination_verdict": ["supported", None, None],
        "coordination_verdict_matched": ["not supported", None, None],
        "note": [HOSTILE, None, None],
    }), sweep / "sweep.parquet")  # fmt: skip
    (sweep / "tables").mkdir()
    (sweep / "tables/table1.md").write_text(
        "# Table 1: d_eff/N per model\n\n| model | d_eff/N |\n|---|---|\n| m@step1 | 0.875 |\n"
    )
    (sweep / "tables/table1.csv").write_text("model,d_eff_ratio\nm@step1,0.875\n")
    (sweep / "tables/table2.csv").write_text("model,impact\nm@step1,0.11292126596937846\n")
    (sweep / "figures").mkdir()
    save_figure(sweep / "figures/figure3.svg", "figure 3")
    save_figure(sweep / "figures/dynamics_kappa.svg", "kappa vs step")
    (sweep / "notes.md").write_text("## Notes\n\nCheckpoints share one tokenizer: *paired*.\n")
    return sweep


# ---------------------------------------------------------------- page checks
class _Page(HTMLParser):
    """Strict-enough parse: balanced non-void tags, ids, links, resource references."""

    VOID = frozenset({"meta", "img", "br", "hr", "input", "link", "source", "col", "wbr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.ids: list[str] = []
        self.hrefs: list[str] = []
        self.srcs: list[str] = []
        self.imgs: list[dict[str, str | None]] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append(tag)
        if a.get("id"):
            self.ids.append(str(a["id"]))
        for key in ("href", "src", "xlink:href", "action", "poster", "data"):
            if a.get(key) is not None:
                (self.srcs if key != "href" else self.hrefs).append(str(a[key]))
        if tag == "img":
            self.imgs.append(a)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            return
        self.stack.pop()


def parse_page(text: str) -> _Page:
    p = _Page()
    p.feed(text)
    p.close()
    assert not p.errors, p.errors[:5]
    assert p.stack == [], p.stack
    return p


def check_page(text: str) -> _Page:
    """Checks every page must pass: parses, no network, anchors resolve, ids unique."""
    p = parse_page(text)
    assert "script" not in p.tags and "iframe" not in p.tags and "link" not in p.tags
    refs = p.hrefs + p.srcs
    assert not [r for r in refs if re.match(r"\s*(https?:|//|javascript:)", r, re.I)], refs
    assert all(s.startswith("data:image/") for s in p.srcs)
    assert len(p.ids) == len(set(p.ids)), "duplicate ids"
    for h in p.hrefs:
        if h.startswith("#"):
            assert h[1:] in p.ids, f"dangling anchor {h}"
    return p


def embedded(p: _Page) -> dict[str, bytes]:
    """Figure stem -> the bytes embedded in its data URI."""
    out = {}
    for img in p.imgs:
        src = str(img["src"])
        out[str(img["data-figure"])] = base64.b64decode(src.split(",", 1)[1])
    return out


# ---------------------------------------------------------------- a real tiny run
@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report-run")
    model_dir, corpus = tiny_setup(root)
    cfg = make_config(overrides=tiny_overrides(model_dir, corpus))
    ident = identify(cfg, root / "run", cache_dir=root / "cache", progress=False)
    analyze(ident, AnalysisOptions(routing=False), cache_dir=root / "cache", progress=False)
    return root / "run"


def test_report_of_a_real_run(real_run: Path) -> None:
    path = write_run_report(real_run)
    assert path == real_run / "report.html"
    text = path.read_text()
    p = check_page(text)
    stems = {f.stem for f in (real_run / "figures").iterdir()}
    assert len(stems) >= 8
    figs = embedded(p)
    assert sorted(figs) == sorted(stems), "every figure once"
    for stem, data in figs.items():  # the SVG itself, byte for byte
        assert data == (real_run / "figures" / f"{stem}.svg").read_bytes()
    # every claim of claims.csv is a row, its verdict coloured
    manifest = json.loads((real_run / "manifest.json").read_text())
    with open(real_run / "analyses/claims.csv", newline="") as fh:
        claims = list(csv.DictReader(fh))
    assert len(claims) >= 8
    claims_part = text.split('id="claims"')[1].split("<section")[0]
    assert claims_part.count("<tr>") == len(claims) + 1
    for row in claims:
        assert f">{_esc(row['claim'])}<" in claims_part
    cls = {"supported": "v-supported", "not supported": "v-not-supported"}
    for row in claims:
        want = cls.get(
            row["verdict"], "v-inconclusive" if row["verdict"] == "inconclusive" else "v-none"
        )
        assert f'class="{want}">{_esc(row["verdict"])}<' in claims_part
    # every table of analyses/ has its section; provenance and summary are there
    for csv_file in (real_run / "analyses").glob("*.csv"):
        if csv_file.name != "claims.csv":
            assert f'id="analysis-{csv_file.stem}"' in text
    assert manifest["run_id"] in text and "Stage timings" in text
    assert 'id="status-banner"' not in text
    first_heading = (real_run / "summary.md").read_text().split("\n## ")[1].split("\n")[0]
    assert f"<h3>{_esc(first_heading)}</h3>" in text


def _esc(s: str) -> str:
    return html.escape(s, quote=False)


# ---------------------------------------------------------------- synthetic runs
def test_hostile_strings_are_escaped(tmp_path: Path) -> None:
    run = write_run_dir(tmp_path / "run")
    text = write_run_report(run).read_text()
    check_page(text)
    assert "<script" not in text.lower()
    # summary, claims finding, analyses CSV cell, config value, figure caption: all escaped
    assert text.count(ESCAPED) >= 5
    assert "1.23e-07" in text and "12345678" in text and ">0.0099<" in text


def test_figures_each_once_svg_preferred_png_fallback(tmp_path: Path) -> None:
    run = write_run_dir(tmp_path / "run")
    (run / "figures/broken.svg").write_text("<svg><g></svg>")
    save_figure(run / "figures/broken.png", "fallback")
    (run / "figures/unshowable.svg").write_text("not svg at all")
    (run / "figures/notes.pdf").write_bytes(b"%PDF-1.4")
    text = write_run_report(run).read_text()
    figs = embedded(check_page(text))
    assert sorted(figs) == ["broken", "hostile", "only_png", "rank_curve", "spectra"]
    assert figs["broken"] == (run / "figures/broken.png").read_bytes()
    assert figs["rank_curve"] == (run / "figures/rank_curve.svg").read_bytes()
    assert figs["only_png"].startswith(b"\x89PNG")
    assert "This figure cannot be shown: unshowable.svg: not well-formed SVG" in text
    # the paper's figures first ("Figure 1: ..."), the caption without "(also .svg)"
    order = [
        f.stem
        for f in collect_figures(
            run / "figures",
            {"figures/spectra.svg": "x", "figures/rank_curve.png": "Figure 1: r (also .svg)"},
        )
    ]
    assert order[:2] == ["rank_curve", "spectra"]
    assert "Figure 1: log-log rank curve of Δloss <span" in text


def test_layers_and_interventions_sections(tmp_path: Path) -> None:
    run = write_addons(write_run_dir(tmp_path / "run"))
    text = write_run_report(run).read_text()
    p = check_page(text)
    figs = embedded(p)
    assert sorted(figs) == ["depth", "hostile", "interventions", "only_png", "rank_curve",
                            "spectra"]  # fmt: skip
    assert figs["depth"] == (run / "figures/depth.svg").read_bytes()
    assert figs["interventions"] == (run / "interventions/interventions.svg").read_bytes()
    sections = text.split('<section id="')
    by_id = {part.split('"', 1)[0]: part for part in sections[1:]}
    # the depth figure is in the per-layer section (once), not among the other figures
    assert 'data-figure="depth"' in by_id["layers"]
    assert "plateau size and κ against layer" in by_id["layers"]
    assert 'href="layers/layer_00.json"' in by_id["layers"]
    assert "0.93" in by_id["layers-screen_quality"] and "0.52" in by_id["layers-layers"]
    assert 'data-figure="depth"' not in text.split('<section id="figures">')[1]
    # the interventions: figure, table, generations (escaped), CSV folded
    assert 'data-figure="interventions"' in by_id["interventions"]
    iv = by_id["interventions-interventions"]
    assert "<h4>Greedy generations</h4>" in iv and f"sat {ESCAPED}" in iv
    assert "interventions.csv: 1 row(s)" in iv
    # the section files are in the summary, not repeated as tables
    assert 'id="layers-summary"' not in text and 'id="interventions-summary"' not in text
    # the summary's code spans link into the sections
    for rel, anchor in (("figures/depth.png", "fig-depth"),
                        ("layers/screen_quality.csv", "layers-screen_quality"),
                        ("interventions/interventions.md", "interventions-interventions"),
                        ("interventions/interventions.png", "interventions-fig-interventions")):  # fmt: skip
        assert f'<a href="#{anchor}"><code>{rel}</code></a>' in text, rel
    toc = text.split('<nav class="toc">')[1].split("</nav>")[0]
    assert toc.index("#analyses") < toc.index("#layers") < toc.index("#interventions")
    assert toc.index("#interventions") < toc.index("#figures")


def test_no_addon_sections_without_their_directories(tmp_path: Path) -> None:
    run = write_run_dir(tmp_path / "run")
    save_figure(run / "figures/depth.svg", "depth")  # a figure of that name, but no layers/
    text = write_run_report(run).read_text()
    check_page(text)
    assert 'id="layers"' not in text and 'id="interventions"' not in text
    assert 'data-figure="depth"' not in text  # a depth figure belongs to the layers stage


def test_no_addon_sections_for_stages_that_did_not_finish(tmp_path: Path) -> None:
    """Files of an add-on stage that failed (the manifest records no finished stage) may be
    half rewritten: the page shows neither them nor links to them."""
    run = write_addons(write_run_dir(tmp_path / "run"))
    m = json.loads((run / "manifest.json").read_text())
    del m["stages"]["layers"], m["stages"]["interventions"]
    m["error"] = {"stage": "interventions", "type": "RuntimeError", "message": "boom"}
    (run / "manifest.json").write_text(json.dumps(m))
    text = write_run_report(run).read_text()
    check_page(text)  # no dangling anchors: the summary's code spans are left unlinked
    assert 'id="layers"' not in text and 'id="interventions"' not in text
    assert 'data-figure="depth"' not in text and 'data-figure="interventions"' not in text
    assert "<code>layers/screen_quality.csv</code>" in text


@pytest.mark.parametrize(
    ("status", "extra", "kind", "words"),
    [
        ("failed", {"error": {"stage": "forward", "type": "NumericalError", "message": "NaN"}},
         "banner", ["incomplete: it failed", "forward", "NumericalError: NaN"]),
        ("interrupted", {"error": {"stage": "ablation", "type": "KeyboardInterrupt",
                                   "message": ""}}, "banner", ["was interrupted", "ablation"]),
        ("identified", {}, "banner warn", ["Identification only", "raretoken analyze"]),
        ("weird", {}, "banner", ["incomplete", "weird"]),
    ],
)  # fmt: skip
def test_incomplete_run_says_so_at_the_top(
    tmp_path: Path, status: str, extra: dict[str, Any], kind: str, words: list[str]
) -> None:
    text = write_run_report(write_run_dir(tmp_path / "run", status=status, **extra)).read_text()
    check_page(text)
    m = re.search(r'<div class="([^"]+)" role="alert" id="status-banner">(.*?)</div>', text)
    assert m is not None and m.group(1) == kind
    assert text.index("status-banner") < text.index('id="summary"')
    for w in words:
        assert w in m.group(2)


def test_a_run_whose_process_is_gone_is_reported_interrupted(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    running = {"stage": "forward", "pid": int(proc.stdout), "host": socket.gethostname(),
               "since": "2026-01-01T00:00:00+00:00"}  # fmt: skip
    run = write_run_dir(tmp_path / "run", status="running", running=running)
    text = write_run_report(run).read_text()
    assert "was interrupted" in text and "<code>forward</code> did not finish" in text


def test_not_a_run_directory(tmp_path: Path) -> None:
    with pytest.raises(RunDirectoryError, match="not a raretoken run directory"):
        write_run_report(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(RunDirectoryError, match="cannot be read"):
        write_run_report(tmp_path)
    assert not (tmp_path / "report.html").exists()


def test_a_run_without_analyses_or_figures(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"status": "identified"}))
    text = write_run_report(tmp_path).read_text()
    check_page(text)
    assert "No summary.md" in text and "No claims table" in text and "No figures" in text


# ---------------------------------------------------------------- sweeps
def test_sweep_report(tmp_path: Path) -> None:
    sweep = write_sweep_dir(tmp_path / "sweep")
    text = write_sweep_report(sweep).read_text()
    p = check_page(text)
    assert "<script" not in text.lower() and ESCAPED in text
    assert sorted(embedded(p)) == ["dynamics_kappa", "figure3"]
    assert "Figure 3: rank curves" in text
    # the complete task links its report; the failed one its traceback; nothing outside
    assert "tasks/ok/run/report.html" in p.hrefs
    assert 'href="tasks/bad/traceback.txt"' in text and "tasks/bad/run/report.html" not in text
    assert not [h for h in p.hrefs if "etc" in h or h.startswith("..")]
    assert (
        f"no revision {ESCAPED}" in text
        and "ModelLoadError: no such revision &lt;step9&gt;" in text
    )
    banner = re.search(r'id="status-banner">(.*?)</div>', text)
    assert banner and "1 of 3 task(s) failed" in banner.group(1) and "wait" in banner.group(1)
    # sweep.parquet: headline columns first, then verdicts, then the rest
    runs = text.split('id="runs"')[1].split("</table>")[0]
    heads = re.findall(r"<th>(.*?)</th>", runs)
    assert heads == ["task", "model", "revision", "status", "kappa", "coordination_verdict",
                     "coordination_verdict_matched"]  # fmt: skip
    assert '<td class="v-supported">supported</td>' in runs and ">0.326<" in runs
    assert '<td class="v-not-supported">not supported</td>' in runs
    # captions: the manifest's (both forms), and those passed in, which win
    assert "κ against training step" in text
    text2 = write_sweep_report(
        sweep, captions={"tables/table2.csv": "Table 2: impacts"}
    ).read_text()
    assert "Table 2: impacts" in text2 and "Figure 3: rank curves" in text2
    full = text.split("All columns of sweep.parquet")[1].split("</table>")[0]
    assert re.findall(r"<th>(.*?)</th>", full)[-2:] == ["zz_extra", "note"]
    for anchor in ("table-table1", "table-table2", "notes", "failures", "provenance"):
        assert f'id="{anchor}"' in text
    assert "<em>paired</em>" in text and ">0.113<" in text


def test_sweep_report_without_manifest_and_with_run_reports(tmp_path: Path) -> None:
    sweep = write_sweep_dir(tmp_path / "sweep", with_manifest=False)
    (sweep / "tasks/ok/run/report.html").unlink()
    text = write_sweep_report(sweep, run_reports=True).read_text()
    check_page(text)
    assert (sweep / "tasks/ok/run/report.html").exists()  # written by run_reports=True
    assert 'href="tasks/ok/run/report.html"' in text
    assert "No readable sweep_manifest.json" in text
    assert text.index(">ok<") < text.index(">bad<") < text.index(">wait<")
    with pytest.raises(RunDirectoryError, match="not a raretoken sweep directory"):
        write_sweep_report(tmp_path / "empty")


# ---------------------------------------------------------------- Markdown subset, numbers
def test_markdown_known_answers() -> None:
    md = (
        "### Title *it*\n\nA para with `a|b<c>` and **bold** and d_eff_ratio and 2*3*4\n"
        "continued.\n\n#### Sub\n\n- one\n- two `x`\n\n1. first\n2. second\n\n"
        "| a | b |\n|:--|--:|\n| `x|y` | 1.5 |\n| <b>hi</b> | q \\| r |\n"
    )
    got = markdown_to_html(md, base_level=2)
    assert got.split("\n") == [
        "<h2>Title <em>it</em></h2>",
        "<p>A para with <code>a|b&lt;c&gt;</code> and <strong>bold</strong> and d_eff_ratio "
        "and 2*3*4 continued.</p>",
        "<h3>Sub</h3>",
        "<ul><li>one</li><li>two <code>x</code></li></ul>",
        "<ol><li>first</li><li>second</li></ol>",
        '<div class="table-wrap"><table><thead><tr><th style="text-align:left">a</th>'
        '<th style="text-align:right">b</th></tr></thead><tbody><tr>'
        '<td style="text-align:left"><code>x|y</code></td><td style="text-align:right">1.5</td>'
        '</tr><tr><td style="text-align:left">&lt;b&gt;hi&lt;/b&gt;</td>'
        '<td style="text-align:right">q | r</td></tr></tbody></table></div>',
    ]


def test_markdown_links_stay_local() -> None:
    got = markdown_to_html(
        "[a](figures/x.svg) [b](https://evil.invalid/p.png) [c](javascript:alert(1)) "
        "[d](//host/x) `figures/y.png`",
        code_links={"figures/y.png": "#fig-y"},
    )
    assert got == (
        '<p><a href="figures/x.svg">a</a> b (https://evil.invalid/p.png) c (javascript:alert(1)) '
        'd (//host/x) <a href="#fig-y"><code>figures/y.png</code></a></p>'
    )


@pytest.mark.parametrize(
    ("value", "text"),
    [("16", "16"), ("1.0", "1"), ("0.009900990099009901", "0.0099"), ("4186.0", "4186"),
     ("0.875", "0.875"), ("3.208519388786215e-18", "3.21e-18"), ("-0.000171", "-1.71e-04"),
     ("12345.678", "12346"), ("2.5e7", "2.50e+07"), ("0", "0"), ("", "–"), (None, "–"),
     ("nan", "nan"), ("top-16", "top-16"), (True, "true"), (0.5, "0.5"), (7, "7"),
     (float("inf"), "inf"), ("13 of 16", "13 of 16")],
)  # fmt: skip
def test_number_formatting(value: Any, text: str) -> None:
    assert format_number(value) == text


# ---------------------------------------------------------------- layering
def test_layering() -> None:
    """report reads directories only: it does not import sweep; run does not import report
    (static: the modules' own imports; run and stats do not import sweep themselves)."""

    def imports(package: str) -> set[str]:
        names = set()
        for path in (SRC / package).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom):
                    parts = ["raretoken", package][: 3 - node.level] if node.level else []
                    names.add(".".join([*parts, node.module or ""]).strip("."))
                elif isinstance(node, ast.Import):
                    names.update(a.name for a in node.names)
        return names

    assert not [m for m in imports("run") if m.startswith("raretoken.report")]
    report = imports("report")
    assert "raretoken.run.manifest" in report  # the resolution above works
    assert not [m for m in report if m.startswith("raretoken.sweep")]
