"""Evaluations. :mod:`.mc`: the paper's multiple-choice format (``cai eval mc``)."""
