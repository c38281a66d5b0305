"""App plumbing shared by the entry points: the CLI wrapper, config building and schemas, run directories."""
