"""The edgefleet inference server: KServe Open Inference Protocol v2 over REST."""
