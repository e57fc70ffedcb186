"""What every service shares: settings, events, stores, auth, errors, gRPC stubs."""
