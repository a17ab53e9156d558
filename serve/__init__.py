"""Ray Serve application for fine-tuned adapters (see the serve issue)."""
