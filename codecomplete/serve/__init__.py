"""The team server: many editors share one engine service on Ray Serve (`codecomplete serve`)."""
