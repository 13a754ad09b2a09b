"""The normalization laboratory behind `normlab compare`: data, models, training, reports.

Example:
    >>> from normlab.lab import load_data, build_model
    >>> data = load_data("digits", limit=200)
    >>> model = build_model("cnn", "gn", image_shape=data.image_shape, num_classes=10)
"""

from normlab.lab.data import ImageData, load_data
from normlab.lab.models import build_model
from normlab.lab.train import RunConfig, train_run

__all__ = ["ImageData", "RunConfig", "build_model", "load_data", "train_run"]
