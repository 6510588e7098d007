"""The matplotlib backend of Cove's code interpreter (`MPLBACKEND=module://cove_inline`).

Figures are drawn with Agg; `plt.show()` hands every open figure to the execution in progress
as a PNG result (see server.py), instead of opening a window.
"""

import sys

from matplotlib.backend_bases import FigureManagerBase as FigureManager  # noqa: F401
from matplotlib.backends.backend_agg import FigureCanvasAgg as FigureCanvas  # noqa: F401


def show(*args, **kwargs):
    flush = getattr(sys.modules.get("__main__"), "flush_figures", None)
    if flush is not None:
        flush()
