"""`clipscale demo`: real image-text pairs without a download (scikit-learn's handwritten digits,
data.py), a 2-process training run with evaluation (run.py), and a report with pictures (report.py)."""

from .run import run_demo

__all__ = ["run_demo"]
