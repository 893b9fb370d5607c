"""Compute behind task kinds (torch split inference, C2C, split CNN, HTTP), found by registry.

Built in the backend issues; until then this package holds nothing.
"""
