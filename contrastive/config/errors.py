class ConfigError(ValueError):
    """A config problem; the message names the key, the file it came from and the valid choices."""
