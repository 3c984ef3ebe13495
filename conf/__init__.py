"""Hydra configs of the entry points, one folder per entry point (shipped as package data)."""
