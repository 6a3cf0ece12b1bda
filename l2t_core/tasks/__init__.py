"""Procedural tasks for the embedded CPU default."""
