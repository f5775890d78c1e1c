"""Command-line entry points (`ldae-train`, `ldae-evaluate`, ...; `train.py` / `evaluate.py` call these)."""
