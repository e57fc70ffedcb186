"""Generated gRPC stubs (``distillery/v1``) and the generator that writes them; do not edit stubs by hand."""
