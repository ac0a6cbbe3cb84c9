"""Adapters over diffusers video transformers, one interface per model family."""
