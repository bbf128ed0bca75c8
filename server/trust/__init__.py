"""Signed update metadata with the TUF properties (built on python-tuf's Metadata API).

See :mod:`server.trust.repository` for the repository the server maintains and
:mod:`server.trust.keys` for key generation (``diffcast keys init``) and rotation.
"""
