"""Where metrics and events go: files in the run directory, the console, W&B."""
