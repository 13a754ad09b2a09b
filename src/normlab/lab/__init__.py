"""The normalization laboratory behind `normlab compare`: data, models, training, reports.

`compare` runs a whole sweep from Python (the user's own model and data welcome) and
returns its records, writing the same files as the command line.

Example:
    >>> from normlab.lab import load_data, build_model
    >>> data = load_data("digits", limit=200)
    >>> model = build_model("cnn", "gn", image_shape=data.image_shape, num_classes=10)
"""

from normlab.lab.api import compare
from normlab.lab.data import ImageData, load_data
from normlab.lab.models import build_model
from normlab.lab.train import RunConfig, train_run

__all__ = ["ImageData", "RunConfig", "build_model", "compare", "load_data", "train_run"]
