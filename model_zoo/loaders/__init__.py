"""Weight loaders, one checkpoint format a module; `model_zoo.loader` picks one and places arrays."""
