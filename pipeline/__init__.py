"""pipeline: progressive-resizing training for timm image classifiers.

`python -m pipeline run stages.yaml` trains through a list of (size, batch, epochs) stages.
"""

__version__ = "0.1.0"
