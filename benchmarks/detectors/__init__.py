"""Detector benchmark: labelled synthetic traces, scoring, and the command line."""
