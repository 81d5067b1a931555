"""Reports: the quality table (normalized accuracy degradation), plots, report.md / report.json and the model card."""
