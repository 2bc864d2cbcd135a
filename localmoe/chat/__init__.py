"""Chat: one question's way through the product — the assistant picks a tier, a session runs it on an engine and
records the exchange, and the display formats what the CLI and the TUI show under each answer."""
