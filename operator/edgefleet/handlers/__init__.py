"""edgefleet.handlers."""
