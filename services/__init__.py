"""Distillery services: one package per service, plus `common`."""
