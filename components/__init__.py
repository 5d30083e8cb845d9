"""Pipeline steps: one module per step, a pure typed function plus a thin CLI."""
