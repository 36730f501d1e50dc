"""File I/O: artifacts and manifests, data files, model and adapter loading."""
