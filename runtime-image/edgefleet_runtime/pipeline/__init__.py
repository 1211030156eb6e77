"""The node's data pipeline (``edgefleet-runtime pipeline``): frames from sources (a file or directory, an HTTP
MJPEG stream, an RTSP/HTTP/file video through PyAV) run through the model in-process with its declared transform,
and the results go to sinks (MQTT, HTTP webhook) through a bounded on-disk queue per sink, so that they survive a
lost uplink and are delivered in order when it returns. docs/pipeline.md describes it."""
