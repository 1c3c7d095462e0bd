"""Contracts and plumbing shared by every Longhaul service: the only code they all import."""
