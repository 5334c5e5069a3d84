"""Training dhara: the joint AR + block-diffusion loss, LoRA, full training, tokenizers."""
