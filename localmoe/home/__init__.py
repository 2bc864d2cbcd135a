"""Home: the user's data directory (`LOCALMOE_HOME`): where files live, `settings.toml`, and the models found there."""
