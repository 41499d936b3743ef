"""The daemon and the `hearth` command line: serving spans, announcing them, the HTTP API."""
