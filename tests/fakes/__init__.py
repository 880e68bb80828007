"""Stand-ins for real services in tests."""
