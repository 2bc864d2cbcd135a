"""localmoe: a local assistant that runs Mixture-of-Experts models offline and logs what each answer cost."""

__version__ = "0.1.0"
