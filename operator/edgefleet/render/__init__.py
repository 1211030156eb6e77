"""edgefleet.render."""
