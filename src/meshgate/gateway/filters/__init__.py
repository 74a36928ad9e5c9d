"""Gateway filters: one module per filter, built once from validated config.

The first filters (authentication, rate limiting, CORS, header policy) arrive with
the gateway security work; this package is where each one goes, one file each.
"""
