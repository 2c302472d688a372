"""diffgrm-dist: distributed training and evaluation of DiffGRM (arXiv 2510.21805)."""

__version__ = "0.1.0"
