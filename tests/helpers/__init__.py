"""Builders of tiny random models and tiny real tokenizers for the tests (no downloads)."""
