"""Prompt sources: red-team and helpful prompt sets from files, wheels and the hub."""
