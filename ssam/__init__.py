"""Semantic-SAM factory: pseudo-labelled instance masks from web image-text pairs.

Subpackages: ``ssam.stages`` (pipeline stages), ``ssam.pipeline`` (config, Ray graph, CLI),
``ssam.model`` (shard format, model builders).
"""

__version__ = "0.1.0"
