"""overinterp: find overinterpretation in image classifiers (Carter et al., NeurIPS 2021)."""

__version__ = "0.1.0"
