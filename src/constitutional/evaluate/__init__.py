"""Evaluations.

* :mod:`.mc` — the paper's multiple-choice format (``cai eval mc``);
* :mod:`.elo` — Elo for harmlessness and helpfulness from pairwise AI judgements
  (``cai eval elo``);
* :mod:`.pm` — a preference model's accuracy on held-out comparisons (``cai eval pm``);
* :mod:`.stats` — Wilson intervals, and the Bradley–Terry (Elo) fit with bootstrap intervals;
* :mod:`.evasive` — the refusal detector and evasiveness rates (``cai eval evasiveness``);
* :mod:`.revision_curve` — PM score against revision number (``cai eval revision-curve``);
* :mod:`.report` — the self-contained ``report.html`` of a run (``cai report``).
"""
