"""report.md, the figures, and every number quoted from the paper."""
