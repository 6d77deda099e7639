"""STD trainer: single-trajectory distillation with the trajectory bank and the asymmetric adversarial loss."""
