"""msnoop: microscopy image embeddings at scale (a Ray implementation of Microsnoop)."""

__version__ = "0.1.0"
