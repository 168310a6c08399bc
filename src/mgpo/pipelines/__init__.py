"""pipelines layer of mgpo."""
