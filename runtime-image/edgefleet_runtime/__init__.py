"""The edgefleet inference server: KServe Open Inference Protocol v2 over REST."""

__version__ = "0.1.0"
