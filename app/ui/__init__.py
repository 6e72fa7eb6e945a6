"""The web pages under ``/ui``: server-rendered, calling the same service functions as the JSON API."""
