"""Networks, losses, samplers and the shared plumbing (configs, storage, media I/O) of the animation model."""
