"""bus_guard benchmarks: programs that print JSON, each with its baseline in the same run."""
