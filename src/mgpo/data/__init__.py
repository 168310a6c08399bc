"""data layer of mgpo."""
