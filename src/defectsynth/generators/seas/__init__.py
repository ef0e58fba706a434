"""SeaS (paper 002): separation and sharing fine-tuning, refined mask prediction, normal-image generation."""
