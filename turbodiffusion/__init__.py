"""The `turbodiffusion` command (see turbodiffusion.cli)."""
