"""show.py's job: a layer's previews (sae/viz/previews.py), the browser pages (sae/viz/browser.py) when wanted,
then the files of features no longer shown removed."""

from __future__ import annotations

from sae.viz.browser import feature_page_name, write_browser
from sae.viz.previews import ShowConfig, ShowResult, remove_stale, write_previews


def show(cfg: ShowConfig) -> ShowResult:
    """Write the grids (and caption files, features.json, the browser) of one layer of a run."""
    result = write_previews(cfg)
    keep = result.files()
    if result.html:
        result.browser = write_browser(result, run_dir=result.run_dir)
        keep |= {f"features/{feature_page_name(p.index)}" for p in result.previews}
    # last, once the new listing is complete: the files of features no longer selected
    result.removed = remove_stale(result.out, keep)
    return result
