"""The Textual chat UI, installed as `localmoe.ui`. It calls the same core the CLI does; the core never imports it."""
