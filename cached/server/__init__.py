"""The daemon's edge: gRPC servicer, error interceptor, health, config and `cached serve`."""
