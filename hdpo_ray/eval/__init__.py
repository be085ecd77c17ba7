"""Evaluation: sample completions on Ray Data, score them per task, pass@k across temperatures."""
