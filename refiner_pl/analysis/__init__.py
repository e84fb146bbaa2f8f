"""Tools that look inside trained models: attention-diversity metrics and reports."""
