"""The animation model: networks, conditions, flow math, losses, samplers, VAE, presets, metrics (local paths only)."""
