"""Trainers: STD (single-trajectory distillation) and SiD-LSG, sharing one skeleton."""
