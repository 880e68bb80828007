"""Pieces shared by the HTTP services: authentication, small helpers."""
