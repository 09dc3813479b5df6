"""StepX dashboard: `streamlit run dashboard/app.py`. Reads traces; never imports torch."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

st.set_page_config(page_title="StepX", page_icon=":material/blur_on:", layout="wide")

PAGES = [
    st.Page("views/gallery.py", title="Gallery", icon=":material/photo_library:", default=True),
    st.Page("views/inspect.py", title="Generate & Inspect", icon=":material/center_focus_strong:"),
    st.Page("views/regions.py", title="Regions", icon=":material/select_all:"),
    st.Page("views/detect.py", title="Detect & Annotate", icon=":material/category:"),
    st.Page("views/compare.py", title="Compare", icon=":material/compare:"),
    st.Page("views/sql.py", title="SQL console", icon=":material/database:"),
    st.Page("views/guide.py", title="Guide", icon=":material/menu_book:"),
]

st.navigation(PAGES).run()
