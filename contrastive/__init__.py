"""contrastive: contrastive learning where negatives are first-class."""
__version__ = "0.1.0"
