"""The origin-write service (every entry point writes through it) and the origins-file watcher."""
