"""Data formats, prompt templates, tokenisation with label masking, and splits. Imports nothing of ours."""
