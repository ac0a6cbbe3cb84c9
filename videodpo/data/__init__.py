"""Video data: reading and writing clips, manifests, GT-Pairs, latent cache, synthetic world."""
