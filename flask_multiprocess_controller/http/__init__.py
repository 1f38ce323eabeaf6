"""The HTTP surface: the resource, the default handlers and all request parsing, the extension's views, errors as
status codes, streams and the OpenAPI document."""
