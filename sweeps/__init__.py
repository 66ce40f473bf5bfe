"""Ray Tune sweeps over IMP chains, logged to MLflow: one entry point per figure of the paper."""
