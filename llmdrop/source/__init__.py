"""Where models and calibration text come from: loading (in memory or as a streamed skeleton), the
per-architecture adapter, calibration tokens."""
