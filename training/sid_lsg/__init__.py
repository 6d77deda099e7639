"""SiD-LSG: data-free one-step distillation with long and short guidance (arXiv 2406.01561)."""
