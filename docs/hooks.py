"""MkDocs hooks: the reference pages' generated parts (every spec field, every CLI command) are written into the
pages that ask for them with a marker line, from the code itself (`peftlab.reference`)."""

from __future__ import annotations

MARKERS = {
    "<!-- peftlab: config fields -->": "config_reference",
    "<!-- peftlab: cli commands -->": "cli_reference",
}


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "<!-- peftlab:" not in markdown:
        return markdown
    from peftlab import reference

    for marker, function in MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, getattr(reference, function)())
    return markdown
