"""Jobs across the mesh: the consumer side (submit, place, watch, migrate) and
the provider side (admit, run in a sandbox, stream back, checkpoint)."""
