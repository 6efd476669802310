"""Standalone scripts that read starquant checkpoints with other library versions."""
