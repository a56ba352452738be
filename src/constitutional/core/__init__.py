"""The pieces every stage shares: errors, files (JSONL, atomic writes), messages, paths, logging."""
