"""Parameter-efficient adapters on a frozen backbone. LoRA first (``lorex.adapters.lora``)."""
