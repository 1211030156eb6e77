"""edgefleet: optimize ML models per hardware class and run them on fleets of edge devices."""

__version__ = "0.1.0"
