module edgefleet/benchmarks/loadgen

go 1.22
