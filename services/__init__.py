"""Longhaul's three services; none imports another."""
