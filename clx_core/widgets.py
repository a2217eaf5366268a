"""Interactive explorers over cached results (JupyterLab + ipywidgets).

An explorer only reads results already on disk or in memory: it never trains, so it cannot
block a headless (papermill/nbval) execution, where it renders as a static widget view.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd


def explorer(table: pd.DataFrame, columns: Sequence[str], show: Callable[[pd.DataFrame], None]):
    """Dropdowns over ``columns`` of ``table``; ``show(rows)`` draws the selected rows.

    Returns the ipywidgets object (display it as a cell's last value), or ``None`` with a note
    when ipywidgets is not installed.
    """
    try:
        import ipywidgets as W
    except ImportError:
        print("ipywidgets is not installed: the explorer needs it (pip install ipywidgets)")
        return None
    controls = {c: W.Dropdown(options=sorted(table[c].unique().tolist(), key=str), description=c) for c in columns}

    def update(**choice):
        rows = table
        for c, v in choice.items():
            rows = rows[rows[c] == v]
        if rows.empty:
            print("no cached results for", choice)
            return
        show(rows)

    return W.interactive(update, **controls)
