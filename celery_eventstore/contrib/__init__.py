"""Integrations with application frameworks (Django, Flask): glue only, no SQL."""
