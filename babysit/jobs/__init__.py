"""Built-in training jobs, written against babysit's public API."""
