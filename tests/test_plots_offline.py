"""`dvc plots show` / `dvc plots diff` pages draw every chart with no network, with titled axes.

In a temporary git copy of the repo (its committed plots/ files), after the set-up step that `make install` runs
(`python -m cifar_resnet.lab.plots_template`), DVC writes its pages and a real headless Chromium, with no network
(`unshare -n`), renders them; `--virtual-time-budget` with `--dump-dom` gives a deterministic end, no sleeps. Vega
leaves one element of class `marks` per chart it drew. DVC's own page (a clone before set-up) is the control: it
still works, and draws nothing offline, which also shows that the browser really had no network.

Needs Debian's `chromium` (.ci/run installs it): skipped without it, except under CI ($CI set), where it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from conftest import REPO

from cifar_resnet.lab import plots_template

pytestmark = pytest.mark.slow  # DVC draws the pages, a real browser reads them

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".svg")
DATA_FILES = ["plots/history.tsv", "plots/lr_range_test.tsv", "plots/confusion.csv"]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=8000", "--dump-dom"]
REMOTE_SCRIPT = re.compile(r"<script\b[^>]*\bsrc\s*=\s*[\"']?\s*(?:https?:)?//", re.IGNORECASE)
MARKS = re.compile(r"<(?:svg|canvas)\b[^>]*\bclass=\"marks\"")
CHART = re.compile(r"vegaEmbed\('#")


def vega_definitions() -> list[dict]:
    """dvc.yaml's vega plots (top-level and per stage; not the image plots), each with its props."""
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    found = []
    for entry in dvc_yaml.get("plots", []):
        (name, props), = entry.items()
        found.append({"id": name, **(props or {})})
    for stage in dvc_yaml["stages"].values():
        for entry in stage.get("plots", []):
            name, props = next(iter(entry.items())) if isinstance(entry, dict) else (entry, {})
            # Not the image plots; not a folder of per-column files either (DVCLive's live plots: one chart per
            # file, titled by its path and column, and absent from a checkout until a run writes it).
            if not name.lower().endswith(IMAGE_SUFFIXES) and Path(name).suffix:
                found.append({"id": name, **(props or {})})
    return found


def test_every_vega_plot_has_a_title_and_axis_titles():
    definitions = vega_definitions()
    assert len(definitions) == 10, [d["id"] for d in definitions]  # 3 of them timing/<stage>.json (bar charts)
    for d in definitions:
        missing = [k for k in ("title", "x_label", "y_label") if not d.get(k)]
        assert not missing, f"{d['id']}: no {missing} in dvc.yaml"


# ------------------------------------------------------------------------------------------------ the browser


@lru_cache(maxsize=None)
def _no_network_prefix() -> tuple[str, ...] | None:
    """`unshare -n` (root, as in CI), or `unshare -rn` (a user namespace) where that is what works."""
    if shutil.which("unshare") is None:
        return None
    for prefix in (("unshare", "-n"), ("unshare", "-r", "-n")):
        if subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    return None


@pytest.fixture(scope="module")
def chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs Debian's `chromium` (apt-get install chromium)")
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    if _no_network_prefix() is None:
        pytest.fail("cannot cut the browser off the network: `unshare -n` (or `unshare -rn`) does not work here")
    return path


def render_offline(chromium: str, page: Path, profile: Path) -> str:
    """The DOM of `page` once Chromium, with no network and a fresh profile, has run it to its end."""
    cmd = [*_no_network_prefix(), chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", page.as_uri()]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"chromium failed ({result.returncode}):\n{result.stderr[-3000:]}"
    assert "</html>" in result.stdout, f"no DOM dumped:\n{result.stderr[-3000:]}"
    return result.stdout


def svg_texts(dom: str) -> set[str]:
    return {t.strip() for t in re.findall(r"<text\b[^>]*>([^<]*)</text>", dom)}


# ------------------------------------------------------------------------------------------------ the repo


@pytest.fixture(scope="module")
def plots_repo(tmp_path_factory):
    """A git copy of the repo's files (its committed plots/ data included), committed; then DVC's default page
    (a clone before set-up), then the set-up step of `make install`. Returns (path, run, the default page)."""
    root = tmp_path_factory.mktemp("plots_offline")
    path = root / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for rel in files:
        if (REPO / rel).is_file():
            (path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, path / rel)
    for rel in DATA_FILES:
        assert (path / rel).is_file(), f"{rel} is missing: the repo commits it (from the real run)"
    assert not (path / ".dvc" / plots_template.TEMPLATE_NAME).exists()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")}
    env.update(PYTHONPATH=str(REPO / "src"), DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")

    def run(*args):
        result = subprocess.run(list(args), cwd=path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{' '.join(args)}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
        return result

    run("git", "init", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "copy")
    # Before set-up: DVC's own page (loads vega from a CDN).
    run(sys.executable, "-m", "dvc", "plots", "show", "-o", str(root / "default"))
    # The set-up step, as `make install` runs it.
    run(sys.executable, "-m", "cifar_resnet.lab.plots_template")
    return path, run, root / "default" / "index.html"


def test_setup_writes_a_git_ignored_deterministic_template_and_makes_it_the_default(plots_repo):
    path, run, _ = plots_repo
    template = path / ".dvc" / plots_template.TEMPLATE_NAME
    data = template.read_bytes()
    assert 0.5e6 < len(data) < 2e6, len(data)
    text = data.decode("utf-8")
    assert text.count("{plot_divs}") == 1 and "{scripts}" not in text  # no {scripts}: DVC adds no CDN tags
    assert not REMOTE_SCRIPT.search(text)
    # Another process builds the same bytes (the bundle is a function of the pinned package).
    assert plots_template.build_template().encode("utf-8") == data
    config = run(sys.executable, "-m", "dvc", "config", "plots.html_template").stdout.strip()
    assert config == plots_template.TEMPLATE_NAME
    # Neither the template nor .dvc/config.local shows up in git.
    assert run("git", "status", "--porcelain").stdout == ""


def drawable(repo: Path) -> list[dict]:
    """The vega plots that have something to draw in `repo`: a timing file the committed record lacks, or one from
    before records (per_epoch, per_part) were written, has none yet."""
    found = []
    for d in vega_definitions():
        path = repo / d["id"]
        if d["id"].endswith(".json") and not (path.is_file() and ('"per_epoch"' in path.read_text() or
                                                                   '"per_part"' in path.read_text())):
            continue
        found.append(d)
    return found


def test_default_page_before_setup_works_online_only(chromium, plots_repo, tmp_path):
    """The control: DVC's own page loads vega from a CDN, so with no network it draws no chart."""
    path, _, default_page = plots_repo
    html = default_page.read_text()
    assert REMOTE_SCRIPT.search(html)
    assert len(CHART.findall(html)) >= len(drawable(path))  # and one per live column, where there are some
    dom = render_offline(chromium, default_page, tmp_path / "profile")
    assert len(MARKS.findall(dom)) == 0


@pytest.mark.parametrize("command", [["show"], ["diff", "HEAD"]], ids=["show", "diff"])
def test_page_draws_every_chart_offline_with_titled_axes(chromium, plots_repo, tmp_path, command):
    path, run, _ = plots_repo
    if command[0] == "diff":
        # A workspace that differs from HEAD: the history of the first 12 epochs only.
        history = path / "plots/history.tsv"
        original = history.read_text()
        history.write_text("".join(original.splitlines(keepends=True)[:13]))
    out = tmp_path / "page"
    try:
        run(sys.executable, "-m", "dvc", "plots", *command, "-o", str(out))
    finally:
        if command[0] == "diff":
            history.write_text(original)
    page = out / "index.html"
    html = page.read_text()
    assert not REMOTE_SCRIPT.search(html), "the page loads a script from the network"
    charts = len(CHART.findall(html))
    assert charts >= len(drawable(path))  # and one per live column, where there are some

    dom = render_offline(chromium, page, tmp_path / "profile")
    assert len(MARKS.findall(dom)) == charts

    texts = svg_texts(dom)
    for d in drawable(path):
        for key in ("title", "x_label", "y_label"):
            assert d[key] in texts, f"{d['id']}: {key} {d[key]!r} not drawn"
    assert "y" not in texts  # DVC's fallback axis title for several y columns
    if command[0] == "diff":
        assert {"HEAD", "workspace"} <= texts  # both revisions in the legends
