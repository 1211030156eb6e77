"""edgefleet's development tooling: the local cluster (`devcluster`), the image builder (`images`), the stack
that joins them (`stack`) and the demo. Used by tests, benchmarks and newcomers; the products (`edgefleet`,
`edgefleet_runtime`) never import it, and their images do not carry it."""
