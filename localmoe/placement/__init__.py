"""Placement: what this machine has (hardware), what a model file holds (layout, read from GGUF or safetensors
headers without loading weights), and where every tensor goes so that it fits (plan)."""
