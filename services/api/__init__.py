"""The REST API: admits or refuses tasks, serves their state, and the web console."""
