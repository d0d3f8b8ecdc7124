"""What crosses a stage boundary, one module per thing: shards and their tables, preference pairs,
model exports with their model card, and loaders that bring a remote model folder down for `model/`."""
