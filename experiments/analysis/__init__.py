"""Analysis toolkit."""
