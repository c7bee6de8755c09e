"""`python -m bench`: our ConsisID path against diffusers' ConsisIDPipeline (see bench/README.md)."""
