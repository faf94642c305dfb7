"""What a plan did, for people: the per-layer table, the heat map, the PNG encoder."""
