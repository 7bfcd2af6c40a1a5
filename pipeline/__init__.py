"""distily's contract between the stages: cache schema, manifest, config, model/data resolution, CLI."""
__version__ = "0.1.0"
