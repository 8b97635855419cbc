"""copal: continual pruning of causal language models (COPAL and its baselines)."""

__version__ = "0.1.0"
