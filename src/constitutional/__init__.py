"""constitutional-ai: Constitutional AI (Bai et al. 2022) — harmlessness from AI feedback."""

__version__ = "0.1.0"
