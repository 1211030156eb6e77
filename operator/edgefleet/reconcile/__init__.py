"""edgefleet.reconcile."""
