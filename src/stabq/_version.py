"""The version of stabq, in a module of its own: what reads it (a saved model's config, the
command line) need not import the whole package."""

__version__ = "0.1.0"
