"""dlm: diffusion language models and their autoregressive baseline on one backbone."""

__version__ = "0.1.0"
