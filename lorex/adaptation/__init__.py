"""Source-free multi-source adaptation (SAGE-reID): pseudo-labels, LoRA experts and the gate."""
