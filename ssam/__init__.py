"""Semantic-SAM factory: pseudo-labelled instance masks from web image-text pairs.

This root package is the foundation (shard format, atomic writes, device, config loading, paths,
weights cache, vocabularies, overlays); it imports nothing else of ours. Subpackages:
``ssam.model`` (networks, builders, engines, training, prediction), ``ssam.stages`` (pipeline
stages), ``ssam.pipeline`` (config, Ray graph, CLI). See docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0"
