"""Platform plumbing: configuration, the command line, logging."""
