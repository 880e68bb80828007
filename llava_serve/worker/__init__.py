"""The model worker service: HTTP app, admission, registration with the controller."""
