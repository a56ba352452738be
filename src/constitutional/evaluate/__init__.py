"""Evaluations.

* :mod:`.mc` — the paper's multiple-choice format (``cai eval mc``);
* :mod:`.elo` — Elo for harmlessness and helpfulness from pairwise AI judgements, Bradley–Terry
  with bootstrap intervals (``cai eval elo``);
* :mod:`.evasive` — the refusal detector and evasiveness rates (``cai eval evasiveness``);
* :mod:`.revision_curve` — PM score against revision number (``cai eval revision-curve``);
* :mod:`.report` — the self-contained ``report.html`` of a run (``cai report``).
"""
