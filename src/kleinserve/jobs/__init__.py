"""Work scheduling between the API and the engine: queue, worker thread, cancellation. Knows no dialect."""
