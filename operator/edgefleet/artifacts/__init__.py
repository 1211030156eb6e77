"""edgefleet.artifacts."""
