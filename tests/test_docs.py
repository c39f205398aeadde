"""README.rst and every page in docs/ render as reStructuredText without a warning."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from docutils.core import publish_doctree
from docutils.utils import SystemMessage

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.rst", *sorted((ROOT / "docs").glob("*.rst"))]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_page_renders_without_warnings(page: Path) -> None:
    errors = io.StringIO()
    try:
        publish_doctree(
            page.read_text(encoding="utf-8"),
            source_path=str(page),
            settings_overrides={"halt_level": 2, "warning_stream": errors, "report_level": 2},
        )
    except SystemMessage as error:
        pytest.fail(f"{page.name}: {error}\n{errors.getvalue()}")
    assert errors.getvalue() == ""


def test_a_broken_table_is_caught(tmp_path: Path) -> None:
    """The check above can fail: a cell running into the column margin is an error."""
    page = "=====  =====\na      b\n=====  =====\nxxxxxxx y\n=====  =====\n"
    with pytest.raises(SystemMessage):
        publish_doctree(page, settings_overrides={"halt_level": 2, "warning_stream": io.StringIO()})
