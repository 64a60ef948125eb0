"""edgecut: split a network between an edge device and a GPU tail service."""

__version__ = "0.1.0"
