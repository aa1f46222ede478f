"""Operations: the admin API, metrics, the request log, the process manager and the demo upstream."""
