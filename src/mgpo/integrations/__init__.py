"""integrations layer of mgpo."""
