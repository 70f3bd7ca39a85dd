"""The HTTP API: app factory, routes, auth and RFC 9457 problem documents."""
