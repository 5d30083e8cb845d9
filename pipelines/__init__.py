"""Pipeline definitions, the one config tree, storage, embedded services and the CLI."""
