"""edgefleet.compiler."""
