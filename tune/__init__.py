"""Ray Tune sweeps over LoRA rank and learning rate (see the sweep issue)."""
