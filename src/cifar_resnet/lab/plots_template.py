"""Offline HTML plots: writes the page template that `dvc plots show` / `dvc plots diff` fill, with vega inlined.

DVC's own page loads vega, vega-lite and vega-embed from a CDN, so without a network it draws nothing. This writes
`.dvc/plots_offline.html`: one inline `<script>` holding the vega-embed bundle (vega + vega-lite + vega-embed, from
vl-convert-python, no network and no node needed to make it), then DVC's `{plot_divs}`. The template has no
`{scripts}` placeholder, so DVC adds no CDN tags, and every page it writes is self-contained (about 0.9 MB).

It then points DVC at it: `dvc config --local plots.html_template plots_offline.html` (the path is relative to
`.dvc/`). Both the template and `.dvc/config.local` are git-ignored set-up products, made by `make install`: a clone
that has not run it gets DVC's default page (draws online, blank offline) instead of an error about a missing
template. The bundle is a pure function of the pinned vl-convert-python and `VEGA_LITE_VERSION`: rerunning this
writes the same bytes (and does not touch the file when nothing changed).

Torch-free: it runs at install time.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

TEMPLATE_NAME = "plots_offline.html"
# The vega-lite that compiles DVC's specs in the browser. DVC's templates are vega-lite v5 specs; 5.21 is the last
# v5 that vl-convert-python bundles. Named here (not "latest") so an upgrade of the package cannot change it silently.
VEGA_LITE_VERSION = "5.21"
# Placeholders that dvc_render replaces anywhere in the template: the bundle must not contain them.
_DVC_PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")

_PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{{refresh_tag}}
<title>DVC Plot</title>
<!-- Written by `python -m cifar_resnet.lab.plots_template` (make install); not in git. Inlined, no network needed:
     vega-embed {embed} + vega {vega} + vega-lite {vega_lite}, from vl-convert-python {vlc} (sha256 {digest}). -->
<script type="text/javascript">
(() => {{
{bundle}
}})();
</script>
<style>
table {{ border-spacing: 15px; }}
</style>
</head>
<body>
{{plot_divs}}
</body>
</html>
"""


def build_template() -> str:
    """The template's text: the inlined vega-embed bundle, then DVC's `{plot_divs}` (and its `{refresh_tag}`)."""
    import vl_convert

    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE_VERSION)
    clashes = [p for p in _DVC_PLACEHOLDERS if p in bundle]
    if clashes:
        raise RuntimeError(f"the vega bundle contains DVC's placeholder(s) {clashes}: DVC would rewrite it")
    # Inside an inline script, "</script" would end the element early; "<\/script" means the same to JavaScript
    # (it can only occur inside a string, regex or comment).
    bundle = re.sub(r"</(script)", r"<\\/\1", bundle, flags=re.IGNORECASE)
    # The bundle declares its own top-level names (const, function); wrapped in a function (see _PAGE) they stay
    # private, and only what it assigns to window (vegaEmbed, vega, vegaLite) is global, for DVC's `var spec = ...`.
    page = _PAGE.format(embed=vl_convert.get_vega_embed_version(), vega=vl_convert.get_vega_version(),
                        vega_lite=VEGA_LITE_VERSION, vlc=_version("vl-convert-python"),
                        digest=hashlib.sha256(bundle.encode("utf-8")).hexdigest(), bundle=bundle)
    # One placeholder each (DVC checks for `{plot_divs}`, replaces every occurrence of each).
    assert page.count("{plot_divs}") == 1 and page.count("{scripts}") == 0, "template placeholders"
    return page


def _version(distribution: str) -> str:
    from importlib.metadata import version

    return version(distribution)


def write_template(dvc_dir: Path) -> Path:
    """Write `dvc_dir/plots_offline.html` atomically; leave it untouched when it already holds these bytes."""
    path = Path(dvc_dir) / TEMPLATE_NAME
    data = build_template().encode("utf-8")
    if path.is_file() and path.read_bytes() == data:
        return path
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def set_default(repo: Path) -> None:
    """Make the template DVC's default for this clone (`.dvc/config.local`, git-ignored)."""
    subprocess.run([sys.executable, "-m", "dvc", "config", "--local", "plots.html_template", TEMPLATE_NAME],
                   cwd=repo, check=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m cifar_resnet.lab.plots_template", description=__doc__.split("\n\n")[0],
        epilog="Writes <repo>/.dvc/plots_offline.html and sets `plots.html_template` in <repo>/.dvc/config.local.")
    parser.add_argument("--repo", type=Path, default=Path.cwd(), help="the DVC repository (default: here)")
    args = parser.parse_args(argv)
    dvc_dir = args.repo / ".dvc"
    if not dvc_dir.is_dir():
        parser.error(f"{args.repo}: not a DVC repository (no .dvc/)")
    path = write_template(dvc_dir)
    set_default(args.repo)
    print(f"{path}: offline plots template ({path.stat().st_size / 1e6:.2f} MB), "
          f"set as plots.html_template in .dvc/config.local")


if __name__ == "__main__":
    main()
