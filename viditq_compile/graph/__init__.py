"""Graph capture (``torch.export`` / Dynamo) and the linear-layer sites the passes rewrite."""
