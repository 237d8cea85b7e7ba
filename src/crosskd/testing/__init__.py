"""Helpers for crosskd's tests: tiny tokenizers (and, later, tiny models) that need no network."""
