"""edgefleet.api."""
