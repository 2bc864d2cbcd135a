"""Data shipped with localmoe: the model catalog, styles, benchmark suites. Read with importlib.resources."""
