"""Stage 1: MoCo-v2 prior-extractor pretraining with a global and a superpixel-local InfoNCE loss."""
