"""Metrics of scores and counts, from the bottom up: what a binned value is and its bins (`binning`), ROC
curves and their metrics from ordered counts (`curve`), the exact tail (`tail`), 95% intervals (`intervals`),
and the streaming ROC over histograms that joins them (`roc`)."""
