"""Training-time reproductions of the papers' figures (``python -m training_runs``)."""
