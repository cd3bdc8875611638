"""Views of attention maps."""
