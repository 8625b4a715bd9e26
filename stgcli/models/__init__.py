"""Model implementations. Each model lives in its own folder, laid out as transformers does."""
