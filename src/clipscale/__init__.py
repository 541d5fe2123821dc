"""clipscale: distributed large-batch CLIP pretraining."""

__version__ = "0.1.0"
