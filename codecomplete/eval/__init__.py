"""Quality evaluation: benchmarks and real files through the engine; generated programs run in a sandbox."""
