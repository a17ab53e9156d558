"""qlora-ray jobs: config, model loading, preflight, training."""
