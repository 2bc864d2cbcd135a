"""Record: what each answer cost (energy meters) and where everything is written (the SQLite recorder)."""
