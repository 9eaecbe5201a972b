"""Metrics of scores and counts: streaming ROC over histograms (`roc`), the exact tail (`tail`), 95% intervals (`intervals`)."""
