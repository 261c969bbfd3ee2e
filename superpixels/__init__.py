"""Superpixel label maps (SLIC / Felzenszwalb via scikit-image): computing, caching, joint augmentation, PNGs."""
