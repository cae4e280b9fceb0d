"""Evaluation: calibration and ranking metrics, plots, printed tables."""
