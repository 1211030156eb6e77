"""edgefleet.devcluster."""
